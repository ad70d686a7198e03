"""The closed loop (app/monitoring/loop.py) over real parts: a SQLite metadata store, a local
MLflow (SQLite), training jobs run in process by the job runner, prediction-log rows written by
the PredictionLogService, feedback recorded by the FeedbackStore, and canary rollouts made and
judged by the RolloutController on logged traffic. No mocks."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from tests.support import Clock
from app.cli import DEMO_JOB
from app.errors import Conflict
from app.monitoring.loop import RetrainingSpec, RetrainLoop, RetrainPolicy, build_job_spec
from app.predlog.ids import new_request_id
from app.predlog.records import PredictionRecord

T0 = datetime.now(timezone.utc).replace(microsecond=0)


class Platform:
    pass


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path_factory):
    """The metadata store's database for the module: a SQLite file, or a new PostgreSQL
    database (tests/conftest.py's ``postgres_database``, as ``store_url`` makes per test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('meta') / 'meta.db'}"
        return
    from tests.conftest import postgres_database

    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def platform(tmp_path_factory, database_url):
    """One store, one MLflow and one champion (iris, trained by a real job) for the module;
    each test works on endpoints of its own."""
    from app.jobs.runner import run_job
    from app.predlog.service import PredictionLogService
    from app.registry.mlflow_registry import ModelRegistry
    from app.registry.service import RegistryService
    from app.settings import load_settings
    from app.store import MetadataStore
    from app.training.spec import TrainingJobSpec

    tmp = tmp_path_factory.mktemp("loop")
    settings = load_settings("local", matih_home=str(tmp / "home"), database_url=database_url,
                             mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    settings.matih_home.mkdir(parents=True, exist_ok=True)
    store = MetadataStore(settings.database_url)
    store.migrate()
    p = Platform()
    p.settings, p.store = settings, store
    p.svc = RegistryService(settings, ModelRegistry(settings), store)
    p.log = PredictionLogService(settings)
    champion = store.create_job("training", "iris-logreg",
                                TrainingJobSpec.model_validate(DEMO_JOB).model_dump(mode="json"), "dev")
    p.champion_job = champion["job_id"]
    p.run = lambda job_id: (store.transition_job(job_id, "running", expect="queued"),
                            run_job(job_id, settings, store))[1]
    done = p.run(champion["job_id"])
    assert done["status"] == "succeeded", done
    p.features = json.loads(p.svc.registry.resolve("iris@champion", use_cache=False).tags["matih.feature_names"])
    from app.datasets import load_dataset

    p.iris = load_dataset("builtin://iris")
    yield p
    store.dispose()


def _loop(p, clock=None) -> RetrainLoop:
    return RetrainLoop(p.store, p.settings, p.svc, clock)


def _endpoint(p, name: str) -> None:
    p.store.create_endpoint(name, "iris@champion", "onnx", {}, "dev")


def _log_labelled(p, endpoint: str, at: datetime, n: int, *, labels=None, extra=()) -> list[str]:
    """``n`` iris rows predicted on ``endpoint`` just before ``at`` (logged as the Gateway logs
    them), each labelled with its true class (or ``labels[i]``) through the FeedbackStore;
    ``extra`` feedback rows (dicts without request_id: applied to further logged rows)."""
    from app.predlog.feedback import FeedbackStore

    rng = np.random.default_rng(7)
    rows = p.iris.iloc[rng.permutation(len(p.iris))[: n + len(extra)]]
    start = (at - timedelta(minutes=10)).timestamp()
    records, ids = [], []
    for i, (_, row) in enumerate(rows.iterrows()):
        ts = start + i
        rid = new_request_id(ts)
        ids.append(rid)
        records.append(PredictionRecord(rid, ts, endpoint, "", "iris", "1", 5.0,
                                        inputs={"instances": [[float(row[f]) for f in p.features]]},
                                        feature_names=p.features, outputs={"predictions": [int(row["target"])]}))
    p.log.write(records)
    p.log.flush()
    feedback = []
    for i in range(n):
        label = int(rows.iloc[i]["target"]) if labels is None else labels[i]
        feedback.append({"request_id": ids[i], "label": label})
    for j, row in enumerate(extra):
        feedback.append({"request_id": ids[n + j], **row})
    out = FeedbackStore(p.store).record(endpoint, feedback, "labeller", known=lambda got: set(got))
    assert all(r["status"] != "rejected" for r in out), out
    return ids


def _events(p, endpoint: str):
    from sqlalchemy import select

    from app.store.models import Event

    with p.store.transaction() as s:
        return [(r.type, r.subject, r.data) for r in s.scalars(select(Event).order_by(Event.id))
                if r.type.startswith("retrain.") and r.data.get("endpoint") == endpoint]


def _audits(p, trigger_id: str):
    items, _ = p.store.list_audit(limit=500, resource_type="retrain_trigger")
    return [a["action"] for a in reversed(items) if a["resource_id"] == trigger_id]


# -- specs ------------------------------------------------------------------------------------------
def test_the_specs_check_what_each_policy_needs_and_the_rollout_fields():
    for bad in ({"kind": "performance"}, {"kind": "schedule"}, {"kind": "labels"}, {"kind": "drift", "x": 1},
                {"kind": "performance", "below": float("nan")}):
        with pytest.raises(ValidationError):
            RetrainPolicy.model_validate(bad)
    assert RetrainPolicy(kind="performance", below=0.8).metric == "accuracy"
    with pytest.raises(ValidationError, match="endpoint"):
        RetrainingSpec(rollout={"endpoint": "x"})
    with pytest.raises(ValidationError, match="rollout.steps"):
        RetrainingSpec(rollout={"steps": [50, 10, 100]})
    with pytest.raises(ValidationError, match="rollout.nope"):
        RetrainingSpec(rollout={"nope": 1})
    with pytest.raises(ValidationError):
        RetrainingSpec(extra_field=1)
    spec = RetrainingSpec(rollout={"steps": [10, 100], "bake_s": 5})
    assert spec.cooldown_s == 3600 and spec.max_concurrent == 1 and spec.data.min_rows == 50
    assert all(f.description for model in (RetrainingSpec, RetrainPolicy)
               for f in model.model_fields.values())


def test_the_job_spec_is_the_champions_with_new_data_and_the_loops_fixed_parts():
    base = {**DEMO_JOB, "dataset": {"uri": "builtin://iris", "target": "target", "split": {"seed": 3}},
            "validation": {"gates": [{"metric": "accuracy", "min": 0.5}], "alias_on_pass": "staging",
                           "compare_with": "other"}}
    out = build_job_spec(base, {"hyperparameters": {"C": 0.5}, "validation": {"gates": [
        {"metric": "accuracy", "beat_champion_by": 0.0}]}}, dataset_uri="/d/x.parquet", model="iris", endpoint="ep")
    assert out["dataset"]["uri"] == "/d/x.parquet" and out["dataset"]["target"] == "target"
    assert out["dataset"]["split"]["seed"] == 3  # kept from the champion's spec
    assert out["hyperparameters"] == {"max_iter": 300, "C": 0.5}  # merged, not replaced
    assert out["validation"]["gates"] == [{"metric": "accuracy", "min": None, "max": None, "beat_champion_by": 0.0}]
    assert (out["validation"]["compare_with"], out["validation"]["alias_on_pass"]) == ("champion", "challenger")
    assert out["register_as"] == "iris" and out["name"] == "retrain-ep"
    from app.errors import InvalidInput

    with pytest.raises(InvalidInput, match="estimator|framework"):
        build_job_spec(base, {"framework": "jax"}, dataset_uri="/d", model="iris", endpoint="ep")


# -- policies ---------------------------------------------------------------------------------------
def test_policies_fire_on_the_runs_outputs_and_the_same_run_twice_creates_nothing(platform):
    p = platform
    _endpoint(p, "ep-pol")
    clock = Clock(T0)
    loop = _loop(p, clock)
    spec = RetrainingSpec(policies=[{"kind": "drift"}, {"kind": "performance", "below": 0.8},
                                    {"kind": "labels", "rows": 5}], cooldown_s=0, max_concurrent=10)
    calm = {"drift.dataset": False, "drift.share": 0.1, "performance.accuracy": 0.9, "labels.new": 2}
    assert loop.evaluate("ep-pol", spec, calm, "run1", clock()) == []
    assert loop.evaluate("ep-pol", spec, {"performance.accuracy": float("nan")}, "run1b", clock()) == []
    bad = {"drift.dataset": True, "drift.share": 0.6, "performance.accuracy": 0.7, "labels.new": 7}
    made = loop.evaluate("ep-pol", spec, bad, "run2", clock())
    assert [(t["id"], t["policy"], t["status"]) for t in made] == [
        ("run2-drift", "drift", "pending"), ("run2-performance", "performance", "pending"),
        ("run2-labels", "labels", "pending")]
    assert made[1]["reason"]["values"] == {"performance.accuracy": 0.7, "below": 0.8}
    assert made[0]["reason"]["values"]["drift.share"] == 0.6 and made[0]["spec"]["cooldown_s"] == 0
    assert loop.evaluate("ep-pol", spec, bad, "run2", clock()) == []  # idempotent by trigger id
    items, _ = loop.chain("ep-pol")
    assert sorted(t["id"] for t in items) == ["run2-drift", "run2-labels", "run2-performance"]
    assert [e[0] for e in _events(p, "ep-pol")] == ["retrain.triggered"] * 3
    assert _events(p, "ep-pol")[0][1] == "monitors/ep-pol/triggers/run2-drift"
    assert _audits(p, "run2-drift") == ["retrain.triggered"]
    assert loop.evaluate("ep-pol", RetrainingSpec(enabled=False, policies=spec.policies), bad, "run3") == []


def test_cooldown_and_max_concurrent_record_skipped_triggers_that_do_not_count(platform):
    p = platform
    for name in ("ep-cool", "ep-max"):
        _endpoint(p, name)
    clock = Clock(T0)
    loop = _loop(p, clock)
    drift = {"drift.dataset": True}
    cool = RetrainingSpec(policies=[{"kind": "drift"}], cooldown_s=3600, max_concurrent=5)
    [first] = loop.evaluate("ep-cool", cool, drift, "c1", clock())
    clock.advance(60)
    [held] = loop.evaluate("ep-cool", cool, drift, "c2", clock())
    assert held["status"] == "skipped" and "cooldown" in held["reason"]["skipped"] and held["finished_at"]
    clock.advance(3541)  # 3601 s after the first; the skipped one does not restart the cooldown
    [again] = loop.evaluate("ep-cool", cool, drift, "c3", clock())
    assert first["status"] == again["status"] == "pending"
    assert [e[0] for e in _events(p, "ep-cool")] == ["retrain.triggered", "retrain.skipped", "retrain.triggered"]

    one = RetrainingSpec(policies=[{"kind": "drift"}], cooldown_s=0, max_concurrent=1,
                         data={"min_rows": 10})
    [open_] = loop.evaluate("ep-max", one, drift, "m1", clock())
    [blocked] = loop.evaluate("ep-max", one, drift, "m2", clock())
    assert blocked["status"] == "skipped" and blocked["reason"]["blocked_by"] == ["m1-drift"]
    with pytest.raises(Conflict, match="open"):
        loop.trigger_manual("ep-max", one, "alice", "now please")
    # the open one ends (nothing logged on ep-max: too few labelled rows) and frees the slot
    out = loop.start("m1-drift")
    assert out["status"] == "skipped" and "0 labelled rows" in out["error"] and "min_rows (10)" in out["error"]
    assert out["steps"][-1]["detail"]["dataset"]["window_rows"] == 0
    [freed] = loop.evaluate("ep-max", one, drift, "m3", clock())
    assert freed["status"] == "pending"
    manual_spec = one.model_copy(update={"max_concurrent": 2})
    manual = loop.trigger_manual("ep-max", manual_spec, "alice", "now please")
    assert manual["policy"] == "manual" and manual["status"] == "pending" and manual["reason"]["by"] == "alice"
    assert _audits(p, "m1-drift") == ["retrain.triggered", "retrain.skipped"]


def test_a_schedule_fires_once_per_period_with_an_idempotent_slot_id(platform):
    p = platform
    _endpoint(p, "ep-sched")
    clock = Clock(datetime(2026, 12, 1, 10, 0, 30, tzinfo=timezone.utc))
    loop = _loop(p, clock)
    spec = RetrainingSpec(policies=[{"kind": "schedule", "every_s": 600}, {"kind": "drift"}], cooldown_s=0,
                          max_concurrent=10)
    slot = int(clock().timestamp() // 600)
    [made] = loop.evaluate("ep-sched", spec, {}, None, clock())  # the monitor's tick: no run
    assert made["id"] == f"sched-ep-sched-{slot}" and made["policy"] == "schedule" and made["run_id"] is None
    clock.advance(10)
    assert loop.evaluate("ep-sched", spec, {}, None, clock()) == []
    clock.advance(580)  # the next slot, but not every_s after the last one yet
    assert loop.evaluate("ep-sched", spec, {}, None, clock()) == []
    clock.advance(20)
    [nxt] = loop.evaluate("ep-sched", spec, {"drift.dataset": False}, "s1", clock())
    assert nxt["id"] == f"sched-ep-sched-{slot + 1}"


def test_labels_policy_counts_labelled_rows_since_the_last_trigger(platform):
    p = platform
    _endpoint(p, "ep-lab")
    loop = _loop(p)  # the real clock: feedback is received at real time
    spec = RetrainingSpec(policies=[{"kind": "labels", "rows": 5}], cooldown_s=0, max_concurrent=10)
    _log_labelled(p, "ep-lab", datetime.now(timezone.utc), 3, extra=[{"reward": 1.0}])
    assert loop.new_labels("ep-lab") == 3  # the reward-only row is no label
    assert loop.evaluate("ep-lab", spec, {}, "l1") == []
    _log_labelled(p, "ep-lab", datetime.now(timezone.utc), 3)
    [t] = loop.evaluate("ep-lab", spec, {}, "l2")
    assert t["reason"]["values"]["labels.new"] == 6
    assert loop.new_labels("ep-lab") == 0


# -- the chain --------------------------------------------------------------------------------------
def test_dataset_job_challenger_rollout_promotion(platform):
    """A manual trigger through the whole chain: the dataset (window rows + the training set,
    labels cast to the training set's ints), the job derived from the champion's, a real
    training run, the challenger, a real rollout judged on logged traffic, the promotion."""
    from app.rollouts.controller import RolloutController

    p = platform
    EP = "ep-chain"
    _endpoint(p, EP)
    clock = Clock(T0)
    loop = _loop(p, clock)
    true = _log_labelled(p, "ep-chain", T0, 60, extra=[{"reward": 1.0}])
    assert len(true) == 61
    # the labels as feedback gives them: mostly ints, some floats, one that is no class
    from app.predlog.feedback import FeedbackStore

    fixes = [{"request_id": true[0], "label": 1.0}, {"request_id": true[1], "label": "setosa?"}]
    FeedbackStore(p.store).record("ep-chain", fixes, "labeller", known=lambda got: set(got))
    spec = RetrainingSpec(rollout={"steps": [50, 100], "bake_s": 1, "min_samples": 20},
                          training={"hyperparameters": {"max_iter": 500}})
    trigger = loop.trigger_manual("ep-chain", spec, "alice", "new data")
    t = loop.start(trigger["id"])
    assert t["status"] == "training", t
    data = t["steps"][-1]["detail"]["dataset"]
    assert (data["window_rows"], data["training_rows"], data["rows"]) == (59, 150, 209)
    assert data["dropped"] == {"no_label": 1, "no_inputs": 0, "bad_label": 1, "missing_feature": 0}
    frame = pd.read_parquet(data["uri"])
    assert list(frame.columns) == [*p.features, "target"] and len(frame) == 209
    assert frame["target"].dtype == np.int64 and set(frame["target"]) == {0, 1, 2}
    assert data["uri"].startswith(p.settings.retrain_data_root()) and data["uri"].endswith(f"{t['id']}.parquet")
    job = p.store.get_job(t["job_id"])
    assert job["job_id"] == f"retrain-{t['id']}" and job["created_by"] == "drift-monitor"
    js = job["spec"]
    assert js["dataset"]["uri"] == data["uri"] and js["estimator"] == DEMO_JOB["estimator"]
    assert js["hyperparameters"] == {"max_iter": 500} and js["register_as"] == "iris"
    assert (js["validation"]["compare_with"], js["validation"]["alias_on_pass"]) == ("champion", "challenger")
    assert t["champion_version"] == "1" and t["model"] == "iris"
    assert t["steps"][-1]["detail"]["base"] == {"job_id": p.champion_job}
    assert loop.start(t["id"])["job_id"] == t["job_id"]  # not pending any more: nothing new
    assert loop.advance(endpoint=EP) == []  # the job is queued

    done = p.run(t["job_id"])
    assert done["status"] == "succeeded", done
    stale = loop.get(t["id"])
    [moved] = loop.advance(endpoint=EP)
    assert moved["status"] == "rolling_out" and moved["candidate_version"] == done["result"]["model_version"]
    assert loop._after_training(stale) is None  # a second monitor's compare-and-set finds it moved
    ctl = RolloutController(p.store, p.settings, p.svc, clock)
    rollout = ctl.get(moved["rollout_id"])
    assert (rollout["status"], rollout["baseline"], rollout["candidate"]) == ("running", "1", moved["candidate_version"])
    assert rollout["spec"]["steps"] == [50, 100] and rollout["created_by"] == "drift-monitor"
    assert loop.advance(endpoint=EP) == []  # the rollout runs

    rng = np.random.default_rng(11)
    start = clock().timestamp()
    records = []
    for i in range(200):
        ts = start + (i + 0.5) * 5 / 200
        cand = rng.random() < 0.5
        records.append(PredictionRecord(new_request_id(ts), ts, "ep-chain", "candidate" if cand else "baseline",
                                        "iris", rollout["candidate"] if cand else "1", 5.0 + float(rng.gamma(2, .5)),
                                        outputs={"predictions": [0]}))
    p.log.write(records)
    p.log.flush()
    clock.advance(5)
    [judged] = ctl.tick()
    assert judged["status"] == "promoted", judged
    clock.advance(1)
    [final] = loop.advance(endpoint=EP)
    assert final["status"] == "promoted" and final["finished_at"]
    assert str(p.svc.get_model("iris")["aliases"]["champion"]) == final["candidate_version"]
    steps = [s["step"] for s in final["steps"]]
    assert steps == ["triggered", "training", "challenger", "rollout_started", "promoted"]
    timings = [s["after_s"] for s in final["steps"]]
    assert timings == sorted(timings) and timings[0] == 0 and final["duration_s"] == timings[-1] == 6
    assert [e[0] for e in _events(p, "ep-chain")] == [
        "retrain.triggered", "retrain.training", "retrain.challenger", "retrain.rollout_started", "retrain.promoted"]
    last = _events(p, "ep-chain")[-1]
    assert last[1] == f"monitors/ep-chain/triggers/{t['id']}" and last[2]["previous_status"] == "rolling_out"
    assert _audits(p, t["id"]) == ["retrain.triggered", "retrain.training", "retrain.challenger",
                                   "retrain.rollout_started", "retrain.promoted"]
    [shown], _ = loop.chain("ep-chain")
    assert shown["id"] == t["id"] and shown["spec"]["rollout"]["bake_s"] == 1 and "retraining" not in shown["reason"]


def test_a_job_whose_gates_fail_keeps_the_champion_and_a_rollout_aborted_ends_rolled_back(platform):
    p = platform
    for name in ("ep-gate", "ep-abort"):
        _endpoint(p, name)
    clock = Clock(T0)
    loop = _loop(p, clock)
    _log_labelled(p, "ep-gate", T0, 55)
    impossible = RetrainingSpec(training={"validation": {"gates": [{"metric": "accuracy", "min": 1.01}]}},
                                data={"include_training_set": False})
    t = loop.start(loop.trigger_manual("ep-gate", impossible, "alice")["id"])
    assert t["steps"][-1]["detail"]["dataset"]["rows"] == 55
    champion = str(p.svc.get_model("iris")["aliases"]["champion"])
    assert p.run(t["job_id"])["status"] == "failed"
    [gated] = loop.advance(endpoint="ep-gate")
    assert gated["status"] == "gated" and gated["error"].startswith("validation_failed") and gated["finished_at"]
    assert gated["steps"][-1]["detail"]["validation"]["gates"][0]["passed"] is False
    assert gated["rollout_id"] is None and str(p.svc.get_model("iris")["aliases"]["champion"]) == champion
    assert [e[0] for e in _events(p, "ep-gate")][-1] == "retrain.gated"

    _log_labelled(p, "ep-abort", T0, 55)
    t = loop.start(loop.trigger_manual("ep-abort", RetrainingSpec(), "alice")["id"])
    assert p.run(t["job_id"])["status"] == "succeeded"
    from app.rollouts.controller import RolloutController

    # a monitor that died after it created the rollout and before it recorded it: the next
    # round takes that rollout over instead of failing on "a rollout is in progress"
    challenger = loop._after_training(loop.get(t["id"]))
    assert challenger["status"] == "challenger"
    ctl = RolloutController(p.store, p.settings, p.svc, clock)
    made = ctl.create({"endpoint": "ep-abort", "candidate": challenger["candidate_version"]}, actor="drift-monitor")
    [rolling] = loop.advance(endpoint="ep-abort")
    assert rolling["status"] == "rolling_out" and rolling["rollout_id"] == made["id"]
    assert rolling["steps"][-1]["detail"]["adopted"] is True
    ctl.abort(rolling["rollout_id"], "bob")
    [back] = loop.advance(endpoint="ep-abort")
    assert back["status"] == "rolled_back" and "aborted" in back["error"]
    assert back["steps"][-1]["detail"]["rollout_status"] == "aborted"
    assert str(p.svc.get_model("iris")["aliases"]["champion"]) == champion


def test_a_champion_not_trained_by_a_job_needs_a_job_spec(platform):
    from tests.unit.test_registry_api import onnx_bytes

    p = platform
    p.svc.register_upload("up", "onnx", onnx_bytes(), "dev")
    p.svc.set_alias("up", "champion", "1", "dev")
    p.store.create_endpoint("ep-up", "up@champion", "onnx", {}, "dev")
    clock = Clock(T0)
    loop = _loop(p, clock)
    _log_labelled(p, "ep-up", T0, 5)
    spec = RetrainingSpec(data={"min_rows": 5}, cooldown_s=0)
    failed = loop.start(loop.trigger_manual("ep-up", spec, "alice")["id"])
    assert failed["status"] == "failed" and "not trained by a job" in failed["error"] and "job_spec" in failed["error"]
    assert failed["model"] == "up" and failed["finished_at"]
    own = spec.model_copy(update={"job_spec": {**DEMO_JOB, "register_as": "other", "name": "x"}})
    t = loop.start(loop.trigger_manual("ep-up", own, "alice")["id"])
    assert t["status"] == "training", t
    js = p.store.get_job(t["job_id"])["spec"]
    assert js["register_as"] == "up" and js["name"] == "retrain-ep-up" and t["champion_version"] == "1"
    assert t["steps"][-1]["detail"]["base"] == {"job_spec": "retraining.job_spec"}
    assert t["steps"][-1]["detail"]["dataset"]["rows"] == 155
    bad = spec.model_copy(update={"job_spec": {**DEMO_JOB, "estimator": "os.system"}, "max_concurrent": 5})
    refused = loop.start(loop.trigger_manual("ep-up", bad, "alice")["id"])
    assert refused["status"] == "failed" and "not allowed" in refused["error"]


def test_the_chain_pages_newest_first(platform):
    p = platform
    _endpoint(p, "ep-page")
    clock = Clock(T0)
    loop = _loop(p, clock)
    spec = RetrainingSpec(policies=[{"kind": "drift"}], cooldown_s=0, max_concurrent=10)
    for i in range(5):
        clock.advance(1)
        loop.evaluate("ep-page", spec, {"drift.dataset": True}, f"p{i}", clock())
    seen, token = [], None
    while True:
        items, token = loop.chain("ep-page", limit=2, page_token=token)
        seen += [t["id"] for t in items]
        if token is None:
            break
    assert seen == [f"p{i}-drift" for i in reversed(range(5))]


def test_monitors_racing_on_one_endpoint_open_one_trigger(platform):
    """Eight monitors (threads, each with its own loop) evaluate eight runs at once under
    max_concurrent 1: the insert-then-check in one transaction lets exactly one through."""
    from concurrent.futures import ThreadPoolExecutor

    p = platform
    _endpoint(p, "ep-race")
    spec = RetrainingSpec(policies=[{"kind": "drift"}], cooldown_s=0, max_concurrent=1)

    def one(i):
        return _loop(p, Clock(T0)).evaluate("ep-race", spec, {"drift.dataset": True}, f"race{i}", T0)

    with ThreadPoolExecutor(8) as pool:
        made = [t for out in pool.map(one, range(8)) for t in out]
    assert sorted(t["status"] for t in made) == ["pending"] + ["skipped"] * 7
    with ThreadPoolExecutor(8) as pool:  # the same runs again: nothing new
        assert [t for out in pool.map(one, range(8)) for t in out] == []


def test_labels_take_the_type_of_the_champions_classes():
    cast = RetrainLoop._cast_labels
    ints = cast([1, 2.0, "2", True, 1.5, "x", None], [0, 1, 2], regression=False)
    assert ints.tolist()[:3] == [1, 2, 2] and ints[3:].isna().all() and str(ints.dtype) == "Int64"
    names = cast(["setosa", 1, None], ["setosa", "virginica"], regression=False)
    assert names.tolist()[:2] == ["setosa", "1"] and names[2] is None
    values = cast([1, 2.5, "3", "nan", None], None, regression=True)
    assert values[:3].tolist() == [1.0, 2.5, 3.0] and values[3:].isna().all()
