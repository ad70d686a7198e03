"""Canary rollouts end to end on the real cluster: the RolloutController actor ticks, the
Gateway splits the traffic by the plan it writes, the prediction log records both arms, and
the judge decides: a good candidate is promoted (champion and previous aliases), a candidate
with ten times the error rate is rolled back in its first step (10%, before 25%), a candidate
20 ms slower is rolled back on latency. Small steps, bake time and samples keep each rollout
to seconds."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.integration.rollout_models import pickled

pytestmark = pytest.mark.integration

ROW = [5.1, 3.5, 1.4, 0.2]
FAST = {"steps": [10, 50, 100], "bake_s": 2, "min_samples": 30}


def _model(c, name: str, versions: list[bytes]) -> None:
    for i, data in enumerate(versions, start=1):
        r = c.post(f"/v1/models/{name}/versions", files={"file": ("m.pkl", data)},
                   data={"format": "sklearn-pickle", "n_features": "4", "task": "classification"})
        assert r.status_code == 201, r.text
        assert c.post(f"/v1/models/{name}/versions/{i}/trust").status_code == 200
    assert c.put(f"/v1/models/{name}/aliases/champion", json={"version": "1"}).status_code == 200
    r = c.post("/v1/endpoints", json={"name": name, "target": f"{name}@champion", "runtime": "native"})
    assert r.status_code == 201, r.text
    out = c.post(f"/v1/endpoints/{name}/predict", json={"instances": [ROW]})
    assert out.status_code in (200, 500), out.text  # 500: a flaky version's bad luck


def _run(platform, name: str, timeout_s: float = 75.0, **spec) -> tuple[dict, dict]:
    """Start a rollout of version 2 on ``name`` and send traffic (4 clients) until it ends;
    returns the rollout and the variants' answer counts."""
    with platform.client() as c:
        r = c.post("/v1/rollouts", json={"endpoint": name, "candidate": "2", **FAST, **spec})
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        stop = threading.Event()
        seen: dict[str, int] = {}
        lock = threading.Lock()

        def load():
            with httpx.Client(base_url=platform.url, headers=c.headers, timeout=30) as client:
                while not stop.is_set():
                    out = client.post(f"/v1/endpoints/{name}/predict", json={"instances": [ROW]})
                    key = out.headers.get("x-matih-variant") or str(out.status_code)
                    with lock:
                        seen[key] = seen.get(key, 0) + 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                rollout = c.get(f"/v1/rollouts/{rid}").json()
                if rollout["status"] not in ("running", "promoting"):
                    return rollout, seen
                time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=35)
        raise AssertionError(f"rollout {rid} did not end in {timeout_s} s: {c.get(f'/v1/rollouts/{rid}').json()}; "
                             f"answers {seen}; {_diagnosis(platform, name)}")


def _diagnosis(platform, name: str) -> str:
    """The controller actor's state and what the log holds of the endpoint, for a failure message."""
    from collections import Counter
    from datetime import datetime, timedelta, timezone

    import ray

    from actors.rollout_controller import find_rollout_controller
    from app.predlog.join import read_window

    actor = find_rollout_controller()
    status = ray.get(actor.status.remote(), timeout=10) if actor is not None else "no controller actor"
    now = datetime.now(timezone.utc)
    table = read_window(platform.settings, name, now - timedelta(minutes=5), now + timedelta(seconds=1))
    counts = Counter(zip(table.column("variant").to_pylist(), table.column("status").to_pylist()))
    return f"controller {status}; log (variant, status) -> rows {dict(counts)}"


def test_a_good_candidate_is_promoted(platform):
    with platform.client() as c:
        _model(c, "ro-good", [pickled(), pickled()])
    rollout, seen = _run(platform, "ro-good")
    assert rollout["status"] == "promoted", rollout
    assert [d["verdict"] for d in rollout["decisions"]] == ["pass", "pass", "promoted"]
    assert seen.get("candidate") and seen.get("baseline"), seen
    with platform.client() as c:
        aliases = c.get("/v1/models/ro-good").json()["aliases"]
        assert (str(aliases["champion"]), str(aliases["previous"])) == ("2", "1")
        ep = c.get("/v1/endpoints/ro-good").json()
        assert ep["target"] == "ro-good@champion" and not (ep["spec"] or {}).get("traffic")
        assert ep["model_version"] == "2"
        out = c.post("/v1/endpoints/ro-good/predict", json={"instances": [ROW]})
        assert out.status_code == 200 and out.json()["model_version"] == "2"
        events = c.get("/v1/events", params={"type": "rollout.promoted"}).json()
        assert any(e["data"]["rollout_id"] == rollout["id"] for e in events["items"]), events


def test_a_candidate_with_ten_times_the_errors_is_rolled_back_before_25_percent(platform):
    with platform.client() as c:
        _model(c, "ro-flaky", [pickled(fail_rate=0.03), pickled(fail_rate=0.3)])
    rollout, _ = _run(platform, "ro-flaky")
    assert rollout["status"] == "rolled_back" and rollout["step"] == 0 and rollout["percent"] == 10, rollout
    failed = rollout["decisions"][-1]
    assert failed["verdict"] == "fail" and failed["stats"]["error_rate"]["failed"], failed
    with platform.client() as c:
        ep = c.get("/v1/endpoints/ro-flaky").json()
        assert not (ep["spec"] or {}).get("traffic") and ep["model_version"] == "1"
        assert str(c.get("/v1/models/ro-flaky").json()["aliases"]["champion"]) == "1"


def test_a_candidate_20_ms_slower_is_rolled_back_on_latency(platform):
    with platform.client() as c:
        _model(c, "ro-slow", [pickled(), pickled(sleep_ms=20)])
    rollout, _ = _run(platform, "ro-slow")
    assert rollout["status"] == "rolled_back", rollout
    failed = rollout["decisions"][-1]
    lat = failed["stats"]["latency"]
    assert lat["failed"] and lat["shift_ms"] > 10 and "latency" in rollout["error"], failed
