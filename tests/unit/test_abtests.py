"""A/B tests: the analysis on synthetic logs (a clear winner, an A/A test, a sample ratio
mismatch, a failing guardrail, too little data, Bayesian and sequential methods), the metric
values, the spec's checks, the /v1/abtests routes over the in-process app with a real log and
real feedback, and the report rendered by a headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.experiments.analysis import analyze, timeline
from app.experiments.metrics import assignment_counts, metric_samples, same_label
from app.experiments.report import render
from app.experiments.spec import ABTestSpec

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
START = NOW - timedelta(hours=2)
HALF = {"a": 0.5, "b": 0.5}


def joined(rows: dict[str, dict[str, np.ndarray]], *, seed: int = 0) -> pa.Table:
    """A joined log window (the columns ``labeled(..., how="left")`` gives that the metrics read):
    per variant, arrays of ``reward``/``value``/``latency``/``status``/``prediction``/``label``
    of one length, one request per row, spread evenly over [START, NOW) in shuffled order."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("request_id", "instance", "timestamp", "variant", "prediction",
                                             "latency_ms", "status", "feedback_label", "feedback_value",
                                             "feedback_reward")}
    for variant, data in rows.items():
        n = len(next(iter(data.values())))
        offsets = rng.uniform(0, (NOW - START).total_seconds() - 1, n)
        for i in range(n):
            cols["request_id"].append(f"{variant}-{i}")
            cols["instance"].append(0)
            cols["timestamp"].append(START + timedelta(seconds=float(offsets[i])))
            cols["variant"].append(variant)
            cols["prediction"].append(json.dumps(data["prediction"][i]) if "prediction" in data else None)
            cols["latency_ms"].append(float(data["latency"][i]) if "latency" in data else 5.0)
            cols["status"].append(int(data["status"][i]) if "status" in data else None)
            cols["feedback_label"].append(json.dumps(data["label"][i]) if "label" in data else None)
            cols["feedback_value"].append(float(data["value"][i]) if "value" in data else None)
            cols["feedback_reward"].append(float(data["reward"][i]) if "reward" in data else None)
    schema = pa.schema([("request_id", pa.string()), ("instance", pa.int32()), ("timestamp", pa.timestamp("us", tz="UTC")),
                        ("variant", pa.string()), ("prediction", pa.string()), ("latency_ms", pa.float64()),
                        ("status", pa.int16()), ("feedback_label", pa.string()), ("feedback_value", pa.float64()),
                        ("feedback_reward", pa.float64())])
    return pa.Table.from_pydict(cols, schema=schema).sort_by("timestamp")


def conversions(n: int, p: float, rng) -> dict[str, np.ndarray]:
    return {"reward": (rng.random(n) < p).astype(float)}


def spec(**kw) -> ABTestSpec:
    body = {"name": "t", "endpoint": "ep", "metric": "conversion", "method": "z_test", **kw}
    return ABTestSpec.model_validate(body)


# -- the analysis -----------------------------------------------------------------------------
def test_clear_winner_z_test():
    rng = np.random.default_rng(1)
    table = joined({"a": conversions(5000, 0.10, rng), "b": conversions(5000, 0.14, rng)})
    out = analyze(spec(), HALF, table, now=NOW)
    assert out["verdict"] == "treatment_wins" and out["winner"] == "b" and out["reliable"] is True
    (c,) = out["comparisons"]
    assert c["treatment"] == "b" and c["significant"] and c["result"]["effect"] == pytest.approx(
        out["arms"]["b"]["mean"] - out["arms"]["a"]["mean"])
    assert c["result"]["ci_low"] > 0 and c["p_adjusted"] == c["result"]["p_value"] < 1e-6
    assert out["arms"]["a"]["n"] == 5000 and out["arms"]["a"]["ci_low"] < out["arms"]["a"]["mean"] < out["arms"]["a"]["ci_high"]
    json.dumps(out, allow_nan=False)  # JSON-ready as the API sends it


@pytest.mark.parametrize("method", ["z_test", "msprt", "bayesian"])
def test_a_a_test_finds_no_difference(method):
    rng = np.random.default_rng(7)
    table = joined({"a": conversions(3000, 0.2, rng), "b": conversions(3000, 0.2, rng)})
    out = analyze(spec(method=method), HALF, table, now=NOW)
    assert out["verdict"] == "no_difference_yet" and out["winner"] is None
    if method != "bayesian":
        assert out["comparisons"][0]["p_adjusted"] > 0.05
    else:
        assert max(out["bayes"]["prob_best"].values()) < 0.95


def test_a_a_tests_read_at_every_look_keep_msprt_within_alpha():
    """300 seeded A/A tests, each read at the analysis' 20 cumulative looks: the verdict's
    always-valid p (the running minimum) calls a winner in at most alpha of them (+ 2 simulation
    standard errors); stopping at the first look where a plain z-test is significant does not."""
    from app.experiments import stats

    rng = np.random.default_rng(123)
    runs, msprt_wins, naive_wins = 300, 0, 0
    for r in range(runs):
        table = joined({"a": conversions(800, 0.2, rng), "b": conversions(800, 0.2, rng)}, seed=r)
        out = analyze(spec(method="msprt"), HALF, table, now=NOW, since=START)
        msprt_wins += out["verdict"] in ("treatment_wins", "control_wins")
        ts = table.column("timestamp").cast(pa.int64()).to_numpy()
        reward = table.column("feedback_reward").to_numpy()
        variant = np.asarray(table.column("variant").to_pylist())
        for end in np.linspace(ts[0], ts[-1] + 1, 21)[1:]:
            seen = ts < end
            a, b = reward[seen & (variant == "a")], reward[seen & (variant == "b")]
            if stats.two_proportion_ztest(int(a.sum()), a.size, int(b.sum()), b.size).p_value < 0.05:
                naive_wins += 1
                break
    bound = 0.05 + 2 * np.sqrt(0.05 * 0.95 / runs)
    assert msprt_wins / runs <= bound
    assert naive_wins / runs > bound


def test_sample_ratio_mismatch_makes_the_test_unreliable():
    rng = np.random.default_rng(2)
    # 50/50 plan, 600/400 requests: chi-square p ~ 2.5e-10; the conversion difference is large too
    table = joined({"a": conversions(600, 0.10, rng), "b": conversions(400, 0.30, rng)})
    out = analyze(spec(min_samples_per_arm=100), HALF, table, now=NOW)
    assert out["srm"]["mismatch"] is True and out["srm"]["p_value"] < 1e-6
    assert out["srm"]["observed"] == {"a": 600, "b": 400}
    assert out["reliable"] is False and out["verdict"] == "unreliable_srm" and out["winner"] is None
    assert "sample ratio mismatch" in out["reasons"][0]
    # the same counts on a 60/40 plan are as planned
    fine = analyze(spec(min_samples_per_arm=100), {"a": 60, "b": 40}, table, now=NOW)
    assert fine["reliable"] is True and fine["verdict"] == "treatment_wins"


def test_srm_counts_requests_not_rows():
    table = pa.table({"variant": ["a", "a", "a", "b"], "request_id": ["r1", "r1", "r2", "r3"]})
    assert assignment_counts(table) == {"a": 2, "b": 1}


def test_guardrail_failure_wins_over_a_better_primary():
    rng = np.random.default_rng(3)
    a = {**conversions(4000, 0.10, rng), "latency": rng.normal(50, 5, 4000)}
    b = {**conversions(4000, 0.14, rng), "latency": rng.normal(70, 5, 4000)}  # better conversion, 20 ms slower
    s = spec(guardrails=[{"metric": "latency"}, {"metric": "error_rate"}])
    out = analyze(s, HALF, joined({"a": a, "b": b}), now=NOW)
    assert out["verdict"] == "guardrail_failed" and "guardrail latency" in out["reasons"][0]
    guards = {c["metric"]: c for c in out["comparisons"] if c["role"] == "guardrail"}
    assert guards["latency"]["method"] == "mann_whitney" and guards["latency"]["direction"] == "increase_is_bad"
    assert guards["latency"]["failed"] and not guards["error_rate"]["failed"]
    # Holm over primary + 2 guardrails: adjusted >= raw, same order
    for c in out["comparisons"]:
        assert c["p_adjusted"] >= c["result"]["p_value"] - 1e-15
    # a faster treatment passes the same guardrail
    b_fast = {**b, "latency": rng.normal(45, 5, 4000)}
    assert analyze(s, HALF, joined({"a": a, "b": b_fast}), now=NOW)["verdict"] == "treatment_wins"


def test_insufficient_data_below_min_samples():
    rng = np.random.default_rng(4)
    table = joined({"a": conversions(60, 0.1, rng), "b": conversions(40, 0.9, rng)})
    out = analyze(spec(min_samples_per_arm=100), HALF, table, now=NOW)
    assert out["verdict"] == "insufficient_data" and "min_samples_per_arm" in out["reasons"][0]
    empty = analyze(spec(), HALF, joined({}), now=NOW)
    assert empty["verdict"] == "insufficient_data" and empty["srm"] is None and empty["arms"]["a"]["n"] == 0


def test_fixed_horizon_read_before_its_sample_size_gives_no_winner():
    rng = np.random.default_rng(5)
    table = joined({"a": conversions(2000, 0.10, rng), "b": conversions(2000, 0.15, rng)})
    out = analyze(spec(mde=0.005, baseline=0.10), HALF, table, now=NOW)
    assert out["sample_size"]["required_per_arm"] > 2000
    assert out["verdict"] == "no_difference_yet" and "peeking" in out["reasons"][0]
    assert out["comparisons"][0]["significant"]  # the test itself is significant; the verdict waits
    big = analyze(spec(mde=0.05, baseline=0.10), HALF, table, now=NOW)
    assert big["sample_size"]["required_per_arm"] < 2000 and big["verdict"] == "treatment_wins"


def test_msprt_winner_and_its_confidence_sequence_narrows():
    rng = np.random.default_rng(6)
    a = {"value": rng.normal(10.0, 3.0, 3000)}
    b = {"value": rng.normal(10.6, 3.0, 3000)}
    table = joined({"a": a, "b": b})
    s = spec(metric="value", method="msprt", expected_samples_per_arm=3000)
    out = analyze(s, HALF, table, now=NOW, since=START)
    (c,) = out["comparisons"]
    assert out["verdict"] == "treatment_wins" and c["result"]["ci_low"] > 0 and c["result"]["looks"] == 20
    assert out["tau2"]["value"] > 0
    series = timeline(s, HALF, table, since=START, until=NOW)
    seq = series["sequences"]["b"]
    assert len(series["buckets"]) == 20 and series["arms"]["a"]["n"][-1] == 3000
    widths = [h - lo for lo, h in zip(seq["ci_low"], seq["ci_high"]) if lo is not None]
    assert widths[-1] < widths[0] / 3 and all(x >= y for x, y in zip(widths, widths[1:]))  # nested: never widens
    # the report's last look is the analysis' result
    assert seq["ci_low"][-1] == pytest.approx(c["result"]["ci_low"]) and seq["p_value"][-1] == pytest.approx(
        c["result"]["p_value"])


def test_lower_is_better_metrics_and_bayesian_direction():
    rng = np.random.default_rng(8)
    a = {"latency": rng.lognormal(3.0, 0.4, 2000)}
    b = {"latency": rng.lognormal(2.8, 0.4, 2000)}  # faster
    table = joined({"a": a, "b": b})
    out = analyze(spec(metric="latency", method="mann_whitney"), HALF, table, now=NOW)
    assert out["verdict"] == "treatment_wins" and out["comparisons"][0]["result"]["effect"] < 0
    bayes = analyze(spec(metric="latency", method="bayesian"), HALF, table, now=NOW)
    assert bayes["verdict"] == "treatment_wins" and bayes["bayes"]["prob_best"]["b"] > 0.99
    assert bayes["bayes"]["scale"] == "negated"
    # error rate: the control errs less -> control wins (Bayesian on the complement)
    errs = joined({"a": {"status": np.where(rng.random(3000) < 0.01, 500, 200)},
                   "b": {"status": np.where(rng.random(3000) < 0.05, 503, 200)}})
    out = analyze(spec(metric="error_rate", method="bayesian"), HALF, errs, now=NOW)
    assert out["verdict"] == "control_wins" and out["winner"] == "a"
    z = analyze(spec(metric="error_rate", method="z_test"), HALF, errs, now=NOW)
    assert z["verdict"] == "control_wins"


def test_three_arms_are_holm_corrected_together():
    rng = np.random.default_rng(9)
    table = joined({"a": conversions(3000, 0.1, rng), "b": conversions(3000, 0.1, rng),
                    "c": conversions(3000, 0.15, rng)})
    out = analyze(spec(), {"a": 1, "b": 1, "c": 1}, table, now=NOW)
    assert out["treatments"] == ["b", "c"] and out["verdict"] == "treatment_wins" and out["winner"] == "c"
    ps = sorted((c["result"]["p_value"], c["p_adjusted"]) for c in out["comparisons"])
    assert ps[0][1] == pytest.approx(min(1.0, 2 * ps[0][0]))  # Holm: smallest times m
    assert ps[1][1] == pytest.approx(max(ps[0][1], ps[1][0]))


# -- metric values ----------------------------------------------------------------------------
def test_metric_values_per_row():
    rows = {
        "a": {"prediction": ["yes", "no", 1, 2.5], "label": ["yes", "yes", 1.0, None], "value": [np.nan, np.nan, np.nan, 3.0],
              "reward": [1.0, 0.0, np.nan, np.nan], "status": [200, 500, 503, 404]},
    }
    table = joined(rows)
    by = {r["request_id"]: i for i, r in enumerate(table.select(["request_id"]).to_pylist())}
    order = [by[f"a-{i}"] for i in range(4)]

    def vals(metric):
        s = metric_samples(table, metric, ["a"])
        return s.values["a"], s.n("a")

    acc, n = vals("accuracy")
    assert n == 3 and sorted(acc.tolist()) == [0.0, 1.0, 1.0]  # "yes"=="yes", "no"!="yes", 1 == 1.0
    rmse, n = vals("rmse")
    assert n == 2 and sorted(rmse.tolist()) == [0.0, 0.25]  # 1 vs label 1.0; 2.5 vs value 3.0
    conv, n = vals("conversion")
    assert n == 3  # rewards 1, 0; the row with only a value counts by its value (3 > 0)
    assert sorted(conv.tolist()) == [0.0, 1.0, 1.0]
    err, n = vals("error_rate")
    assert n == 4 and sorted(err.tolist()) == [0.0, 0.0, 1.0, 1.0]  # 404 is the caller's, not an error
    assert order  # rows keep their variant
    assert same_label(True, True) and not same_label(True, 1) and same_label([2], 2.0) and not same_label("1", 1)


def test_null_status_counts_as_success():
    table = joined({"a": {"reward": [1.0, 0.0]}})
    assert metric_samples(table, "error_rate").values["a"].tolist() == [0.0, 0.0]


# -- the spec ---------------------------------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    ({"metric": "conversion", "method": "welch"}, "does not fit the binary metric"),
    ({"metric": "latency", "method": "z_test"}, "does not fit the continuous metric"),
    ({"metric": "value", "method": "msprt", "guardrails": [{"metric": "error_rate", "method": "welch"}]}, "guardrail method"),
    ({"metric": "conversion", "method": "z_test", "alpha": 0.7}, "alpha"),
    ({"metric": "conversion", "method": "z_test", "baseline": 2.0}, "baseline"),
    ({"metric": "conversion", "method": "z_test", "colour": "red"}, "Extra inputs"),
    ({"metric": "clicks", "method": "z_test"}, "metric"),
])
def test_spec_refuses_what_does_not_fit(body, message):
    with pytest.raises(ValidationError) as err:
        ABTestSpec.model_validate({"name": "t", "endpoint": "ep", **body})
    assert message in str(err.value)


def test_spec_defaults():
    s = spec(guardrails=[{"metric": "latency"}, {"metric": "accuracy"}, {"metric": "value"}])
    assert (s.alpha, s.power, s.min_samples_per_arm, s.control, s.mde) == (0.05, 0.8, 100, None, None)
    assert [(g.method, g.direction) for g in s.guardrails] == [
        ("mann_whitney", "increase_is_bad"), ("z_test", "decrease_is_bad"), ("welch", "decrease_is_bad")]
    assert all(f.description for f in ABTestSpec.model_fields.values())


# -- the report -------------------------------------------------------------------------------
def _report(name: str = "<b>t</b>") -> str:
    rng = np.random.default_rng(10)
    table = joined({"a": {"value": rng.normal(10, 3, 1500)}, "b<x>": {"value": rng.normal(10.8, 3, 1500)}})
    s = spec(name="t", metric="value", method="msprt", guardrails=[{"metric": "latency"}])
    weights = {"a": 0.5, "b<x>": 0.5}
    out = analyze(s, weights, table, now=NOW, since=START)
    test = {"id": "abc", "name": name, "endpoint": "ep&co", "status": "running"}
    return render(test, {**out, "window": {"since": START.isoformat(), "until": NOW.isoformat()}},
                  timeline(s, weights, table, since=START, until=NOW))


def test_report_escapes_user_strings_and_draws_both_charts():
    page = _report()
    assert "<b>t</b>" not in page and "&lt;b&gt;t&lt;/b&gt;" in page and "ep&amp;co" in page
    assert "b<x>" not in page and "b&lt;x&gt;" in page
    assert page.count("<svg") == 2 and 'class="band"' in page and 'class="series"' in page
    assert 'id="verdict"' in page and "treatment_wins" in page
    assert "<script" not in page
    # each chart is well-formed SVG (XML), with one polyline per series and the band per treatment
    import re
    import xml.etree.ElementTree as ET

    svgs = [ET.fromstring(m) for m in re.findall(r"<svg.*?</svg>", page, flags=re.S)]
    ns = "{http://www.w3.org/2000/svg}"
    assert len(svgs[0].findall(f"{ns}polyline")) == 2 and len(svgs[1].findall(f"{ns}polygon")) == 1
    assert all(float(v) >= 0 for pl in svgs[0].findall(f"{ns}polyline")
               for pt in pl.get("points").split() for v in pt.split(","))


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def test_report_renders_in_headless_chromium(tmp_path):
    binary = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if binary is None:
        if os.environ.get("CI") or os.environ.get("MATIH_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed; CI must run the report test (.ci/run: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = tmp_path / "report.html"
    page.write_text(_report(), encoding="utf-8")
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    assert rendered.count("<svg") == 2 and "<polyline" in rendered and "<polygon" in rendered
    assert 'id="verdict"' in rendered and "treatment_wins" in rendered
    shot = tmp_path / "report.png"
    run = subprocess.run([*args, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]  # pixels, not a blank page


# -- the store (SQLite and PostgreSQL) ---------------------------------------------------------
def test_store_create_list_stop_with_audit_and_events(store):
    from sqlalchemy import select

    from app.errors import Conflict, NotFound
    from app.experiments.store import ABTestStore
    from app.store.models import Event

    tests = ABTestStore(store)
    made = [tests.create(f"t{i}", "ep" if i % 2 == 0 else "other", {"metric": "latency"}, "alice") for i in range(5)]
    assert len({t["id"] for t in made}) == 5 and all(len(t["id"]) == 16 for t in made)
    seen, token = [], None
    while True:
        items, token = tests.list("ep", limit=2, page_token=token)
        seen += [t["id"] for t in items]
        if token is None:
            break
    assert seen == [t["id"] for t in reversed(made) if t["endpoint"] == "ep"]  # newest first, each once
    assert tests.stop(made[0]["id"], "bob")["status"] == "stopped"
    with pytest.raises(Conflict):
        tests.stop(made[0]["id"], "bob")
    with pytest.raises(NotFound):
        tests.get("f" * 16)
    tests.set_result(made[0]["id"], {"verdict": "no_difference_yet"})
    assert tests.get(made[0]["id"])["result"] == {"verdict": "no_difference_yet"}
    with store._sessions() as s:
        events = [(e.type, e.subject) for e in s.scalars(select(Event).order_by(Event.id))]
    assert events.count(("abtest.created", f"abtests/{made[0]['id']}")) == 1
    assert events[-1] == ("abtest.stopped", f"abtests/{made[0]['id']}")
    audit = store.list_audit(limit=10, resource_type="abtest")[0]
    assert audit[0]["action"] == "abtest.stopped" and audit[0]["actor"] == "bob"


# -- the API ----------------------------------------------------------------------------------
EP = "abt"
PLAN = {"variants": [{"name": "a", "target": "m@champion", "weight": 50},
                     {"name": "b", "target": "m@challenger", "weight": 50}]}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from app.api.app import create_app
    from app.bootstrap import prepare
    from app.settings import load_settings
    from tests.support import NoJobs, in_process_context

    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    ctx.store.create_endpoint(EP, "m@champion", "onnx", {}, "admin", spec={"traffic": PLAN})
    ctx.store.create_endpoint("solo", "m@champion", "onnx", {}, "admin")
    ctx.store.create_endpoint("bandit", "m@champion", "onnx", {}, "admin",
                              spec={"traffic": {**PLAN, "strategy": "thompson"}})
    app = create_app(ctx)
    clients = {}
    for role in ("viewer", "developer"):
        _, token = ctx.store.create_token(f"t-{role}", role, "admin")
        clients[role] = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    yield settings, ctx, clients
    ctx.store.dispose()


def _log_and_feedback(settings, store, since: datetime, n: int, p: dict[str, float], seed: int = 0) -> None:
    """``n`` one-row requests per variant in the real log (parquet), and a reward for each
    through the real feedback store, conversion rate ``p[variant]``."""
    from app.predlog.feedback import FeedbackStore
    from app.predlog.ids import new_request_id
    from tests.unit.test_feedback import log_rows, write_log

    rng = np.random.default_rng(seed)
    span = (datetime.now(timezone.utc) - since).total_seconds() - 5
    records, feedback = [], []
    for variant, rate in p.items():
        for _ in range(n):
            rid = new_request_id((since + timedelta(seconds=float(rng.uniform(0, span)))).timestamp())
            rows = log_rows(rid, 1, endpoint=EP)
            rows[0].update(variant=variant, status=200)
            records += rows
            feedback.append({"request_id": rid, "reward": float(rng.random() < rate)})
    write_log(settings.predlog.root, records, endpoint=EP)
    FeedbackStore(store).record(EP, feedback, "tester", known=lambda ids: set(ids))


def test_api_round_trip(api):
    settings, ctx, c = api
    since = datetime.now(timezone.utc) - timedelta(minutes=50)
    _log_and_feedback(settings, ctx.store, since, 400, {"a": 0.10, "b": 0.30})
    body = {"name": "checkout button", "endpoint": EP, "metric": "conversion", "method": "msprt",
            "guardrails": [{"metric": "latency"}], "since": since.isoformat()}
    assert c["viewer"].post("/v1/abtests", json=body).status_code == 403
    r = c["developer"].post("/v1/abtests", json=body)
    assert r.status_code == 201, r.text
    test = r.json()
    assert len(test["id"]) == 16 and test["status"] == "running" and test["spec"]["control"] == "a"

    assert c["viewer"].get(f"/v1/abtests/{test['id']}").json()["name"] == "checkout button"
    listed = c["viewer"].get("/v1/abtests", params={"endpoint": EP}).json()
    assert [t["id"] for t in listed["items"]] == [test["id"]]
    assert c["viewer"].get("/v1/abtests", params={"endpoint": "other"}).json()["items"] == []

    analysis = c["viewer"].get(f"/v1/abtests/{test['id']}/analysis")
    assert analysis.status_code == 200, analysis.text
    out = analysis.json()
    assert out["arms"]["a"]["n"] == 400 and out["arms"]["b"]["n"] == 400 and out["srm"]["mismatch"] is False
    assert out["verdict"] == "treatment_wins" and out["winner"] == "b"
    assert c["viewer"].get(f"/v1/abtests/{test['id']}").json()["result"]["verdict"] == "treatment_wins"

    page = c["viewer"].get(f"/v1/abtests/{test['id']}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "checkout button" in page.text and page.text.count("<svg") == 2
    paths = c["viewer"].get("/openapi.json").json()["paths"]
    assert {"/v1/abtests", "/v1/abtests/{test_id}", "/v1/abtests/{test_id}/analysis",
            "/v1/abtests/{test_id}/report.html", "/v1/abtests/{test_id}/stop"} <= set(paths)

    assert c["viewer"].post(f"/v1/abtests/{test['id']}/stop").status_code == 403
    stopped = c["developer"].post(f"/v1/abtests/{test['id']}/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped" and stopped.json()["stopped_at"]
    again = c["developer"].post(f"/v1/abtests/{test['id']}/stop")
    assert again.status_code == 409 and again.json()["code"] == "conflict"
    actions = [a["action"] for a in ctx.store.list_audit(limit=50, resource_type="abtest")[0]]
    assert actions == ["abtest.stopped", "abtest.created"]
    # a stopped test's window ends at its stop: later traffic does not change it
    frozen = c["viewer"].get(f"/v1/abtests/{test['id']}/analysis").json()
    assert frozen["window"]["until"] == stopped.json()["stopped_at"] and frozen["arms"] == out["arms"]


def test_analysis_after_the_plan_lost_the_control_is_a_conflict(api):
    _, ctx, c = api
    ctx.store.create_endpoint("moving", "m@champion", "onnx", {}, "admin", spec={"traffic": PLAN})
    r = c["developer"].post("/v1/abtests", json={"name": "m", "endpoint": "moving", "metric": "latency",
                                                 "method": "welch", "control": "b"})
    assert r.status_code == 201, r.text
    plan = {"variants": [{"name": "a", "target": "m@champion", "weight": 50},
                         {"name": "c", "target": "m@other", "weight": 50}]}
    ctx.store.update_endpoint("moving", {"spec": {"traffic": plan}}, "admin")
    gone = c["viewer"].get(f"/v1/abtests/{r.json()['id']}/analysis")
    assert gone.status_code == 409 and "changed since the test began" in gone.json()["error"]


def test_api_refusals(api):
    _, _, c = api
    dev = c["developer"]
    base = {"name": "x", "endpoint": EP, "metric": "conversion", "method": "z_test"}
    cases = [
        ({**base, "method": "welch"}, 422, "does not fit"),
        ({**base, "endpoint": "ghost"}, 422, "does not exist"),
        ({**base, "control": "zz"}, 422, "control 'zz'"),
        ({**base, "endpoint": "solo"}, 409, "no traffic plan"),
        ({**base, "endpoint": "bandit"}, 409, "fixed split"),
        ({**base, "unknown": 1}, 422, "unknown"),
    ]
    for body, status, text in cases:
        r = dev.post("/v1/abtests", json=body)
        assert r.status_code == status and text in r.json()["error"], (body, r.status_code, r.text)
    assert c["viewer"].get("/v1/abtests/0123456789abcdef").status_code == 404
    assert c["viewer"].get("/v1/abtests/0123456789abcdef/analysis").status_code == 404
    assert c["viewer"].get("/v1/abtests", params={"page_token": "nope"}).status_code == 422


def test_api_list_pages(api):
    _, _, c = api
    ids = [c["developer"].post("/v1/abtests", json={"name": f"p{i}", "endpoint": EP, "metric": "latency",
                                                     "method": "welch"}).json()["id"] for i in range(3)]
    seen, token = [], None
    while True:
        params = {"endpoint": EP, "limit": 2, **({"page_token": token} if token else {})}
        page = c["viewer"].get("/v1/abtests", params=params).json()
        seen += [t["id"] for t in page["items"]]
        token = page["next_page_token"]
        if not token:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
