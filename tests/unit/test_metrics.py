"""app.metrics: a no-op without Ray, every function's labels as declared, and the Grafana
dashboard naming only metrics that app.metrics defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app import metrics
from app.jobs.scheduler import SchedulerCore, job_seconds

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "matih-ml.json"


def _call_every_function() -> None:
    metrics.request("iris", "iris", "3", "", "rest", 200, 0.0012)
    metrics.request("iris", "iris", "3", "b", "grpc", 422, 0.0004)
    metrics.batch("iris", 12, 3)
    metrics.shadow("iris", "churn/7", "ok", 0.004)
    metrics.shadow("iris", "churn/7", "dropped", 0.0)
    metrics.alerts_firing({("iris", "drift-dataset", "warning"): 1})
    metrics.model_loaded("iris", "3", "onnx", 0.8)
    metrics.models_resident("model_server", 2)
    metrics.predlog_dropped("iris", 5)
    metrics.predlog_dropped("iris", 0)  # nothing dropped: nothing recorded (Ray refuses inc(0))
    metrics.predlog_written("iris", 100)
    metrics.job_finished("train", "succeeded", 12.5)
    metrics.jobs_in_state({("train", "queued"): 2, ("train", "running"): 1})
    metrics.jobs_in_state({("train", "running"): 1})
    metrics.outbox_depth(7)
    metrics.events_published("kafka", 3)


def test_without_ray_every_function_is_a_no_op(monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("another test of this process left Ray initialized")
    # an earlier test of this process may have run Ray (and made the registry) and shut it down
    monkeypatch.setattr(metrics, "_registry", None)
    _call_every_function()
    assert metrics._registry is None  # nothing created: no Ray metric, no gauge thread


@pytest.fixture
def registry(monkeypatch):
    """The real Ray metric objects, without a cluster: Ray checks every tag key on each record
    (a missing one raises) and records nowhere."""
    reg = metrics._Registry()
    monkeypatch.setattr(metrics, "_registry", reg)
    yield reg
    reg.closed.set()


def test_every_function_records_with_the_declared_labels(registry):
    _call_every_function()  # Ray raises ValueError for a missing label, TypeError for a non-str value
    for spec in metrics.METRICS.values():
        assert registry.metrics[spec.name].info["tag_keys"] == spec.labels
    gauges = {key: value for key, (_, value) in registry.gauges.items()}
    assert gauges[("matih_jobs", ("train", "queued"))] == 0  # counted before, absent now: 0, not stale
    assert gauges[("matih_jobs", ("train", "running"))] == 1
    assert gauges[("matih_models_loaded", ("model_server",))] == 2
    assert gauges[("matih_event_outbox_depth", ())] == 7


def test_names_follow_prometheus_conventions():
    for spec in metrics.METRICS.values():
        assert spec.name.startswith("matih_")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.kind != "histogram" or list(spec.buckets) == sorted(spec.buckets)
        assert "version" not in spec.labels  # Ray's own label Version (Ray's version) is beside ours
        assert spec.ray_name.startswith("matih_") and not spec.ray_name.endswith("_total")
    assert metrics.METRICS["matih_request_duration_seconds"].buckets[0] <= 0.001  # sub-millisecond
    assert re.fullmatch(metrics.RELABEL_RULE["regex"], "ray_matih_requests_total")


def test_the_grafana_dashboard_names_only_defined_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    known = {series for spec in metrics.METRICS.values() for series in spec.series}
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b(matih_[a-z_]+)\b", target["expr"]))
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= known, f"{panel['title']}: {names - known} not defined in app/metrics.py"
            used |= names
    for var in dashboard["templating"]["list"]:
        assert set(re.findall(r"\b(matih_[a-z_]+)\b", var["definition"])) <= known
    # every metric has a panel
    assert {spec.name for spec in metrics.METRICS.values()} <= {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}


def test_job_counts_and_durations_come_from_the_store(store):
    for i in range(3):
        store.create_job("train", f"j{i}", {}, "alice", job_id=f"j{i}")
    store.create_job("batch", "b", {}, "alice", job_id="b")
    store.transition_job("j0", "running", expect="queued")
    done = store.transition_job("j0", "succeeded", expect="running")
    assert job_seconds(done) >= 0
    assert job_seconds(store.get_job("j1")) == 0.0  # never started
    core = SchedulerCore(store, launcher=None, max_concurrent=1)
    assert core.report_counts() == {("train", "succeeded"): 1, ("train", "queued"): 2, ("batch", "queued"): 1}
    cancelled = core.cancel("j1", "alice")
    assert cancelled["status"] == "cancelled"
    assert store.job_counts()[("train", "cancelled")] == 1
