"""The training slice and the HTTP API without Ray: real MLflow (SQLite), real ONNX Runtime,
the real scheduler policy driven by threads instead of Ray tasks."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.support import in_process_context

from app.api.app import create_app
from app.bootstrap import prepare
from app.cli import DEMO_JOB
from app.errors import InvalidInput
from app.jobs.runner import run_job
from app.jobs.scheduler import SchedulerCore
from app.registry.mlflow_registry import TAG_JOB, TAG_PARITY
from app.schemas import TrainingJobSpec
from app.settings import load_settings
from app.store import MetadataStore
from app.training.pipeline import train_sklearn

IRIS = DEMO_JOB  # the README's first job, one definition in app/cli.py


class _ThreadJob:
    def __init__(self, fn):
        self.thread = threading.Thread(target=fn, daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def cancel(self) -> None:  # threads cannot be killed; the runner's result is then ignored
        pass


class ThreadLauncher:
    def __init__(self, settings, store):
        self.settings, self.store = settings, store

    def launch(self, job):
        return _ThreadJob(lambda: run_job(job["job_id"], self.settings, self.store))


class InlineJobs:
    """JobControl that drives SchedulerCore on each call, as the actor's loop would."""

    def __init__(self, core: SchedulerCore):
        self.core = core

    async def notify(self) -> None:
        self.core.tick()

    async def cancel(self, job_id, actor):
        return self.core.cancel(job_id, actor)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    store = MetadataStore(settings.database_url)
    core = SchedulerCore(store, ThreadLauncher(settings, store), max_concurrent=1)
    ctx = in_process_context(settings, prepared.admin_token, InlineJobs(core))
    client = TestClient(create_app(ctx))
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    yield settings, store, core, client


def wait(client, core, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        core.tick()
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']}")


def test_slice_train_register_serve_without_ray(platform):
    settings, store, core, client = platform
    r = client.post("/v1/training/jobs", json=IRIS)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job = wait(client, core, r.json()["job_id"])
    assert job["status"] == "succeeded", job["logs"]
    res = job["result"]
    assert res["model_version"] == "1" and res["aliases"] == ["champion"]
    assert res["metrics"]["accuracy"] > 0.85 and res["onnx_max_abs_diff"] < 1e-4

    from mlflow import MlflowClient

    mv = MlflowClient(settings.mlflow_tracking_uri).get_model_version_by_alias("iris", "champion")
    assert str(mv.version) == "1" and mv.tags[TAG_JOB] == job["job_id"] and float(mv.tags[TAG_PARITY]) < 1e-4

    assert client.post("/v1/endpoints", json={"name": "iris", "target": "iris@champion"}).status_code == 201
    out = client.post("/v1/endpoints/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]], "return_probabilities": True})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["predictions"] == [0] and body["model_version"] == "1" and body["request_id"]
    assert abs(sum(body["probabilities"][0]) - 1) < 1e-5
    bad = client.post("/v1/endpoints/iris/predict", json={"instances": [[5.1, 3.5]]})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_input"


def test_second_version_does_not_move_champion_and_reruns_register_once(platform):
    settings, store, core, client = platform
    spec = TrainingJobSpec.model_validate({**IRIS, "hyperparameters": {"max_iter": 200, "C": 0.5}})
    lines = []
    first = train_sklearn(spec, settings, "job-x", lambda p, line=None: lines.append(line))
    again = train_sklearn(spec, settings, "job-x", lambda p, line=None: lines.append(line))
    assert first["model_version"] == again["model_version"] == "2"
    assert "registered by an earlier attempt" in lines[-1]
    from mlflow import MlflowClient

    c = MlflowClient(settings.mlflow_tracking_uri)
    assert str(c.get_model_version_by_alias("iris", "champion").version) == "1"
    assert len(c.search_model_versions("name = 'iris'")) == 2


def test_allow_list_and_hyperparameters_are_checked(platform):
    settings, store, core, client = platform
    r = client.post("/v1/training/jobs", json={**IRIS, "estimator": "os.system"})
    assert r.status_code == 422 and r.json()["details"]["field"] == "estimator"
    r = client.post("/v1/training/jobs", json={**IRIS, "dataset": {"uri": "builtin://nope", "target": "t"}})
    assert r.status_code == 422 and "builtin://iris" in r.json()["error"]
    r = client.post("/v1/training/jobs", json={**IRIS, "framework": "jax"})
    assert r.status_code == 422 and "framework" in r.json()["error"]
    spec = TrainingJobSpec.model_validate({**IRIS, "hyperparameters": {"no_such_param": 1}})
    with pytest.raises(InvalidInput, match="hyperparameters"):
        train_sklearn(spec, settings, "job-y", lambda *a: None)


def test_failed_job_records_the_error(platform):
    settings, store, core, client = platform
    r = client.post("/v1/training/jobs", json={**IRIS, "dataset": {"uri": "builtin://iris", "target": "species"}})
    job = wait(client, core, r.json()["job_id"])
    assert job["status"] == "failed" and "species" in job["error"]


def test_cancel_a_queued_job_and_not_twice(platform):
    settings, store, core, client = platform
    job = store.create_job("training", "later", IRIS, "admin")  # queued, not ticked yet
    r = client.post(f"/v1/training/jobs/{job['job_id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = client.post(f"/v1/training/jobs/{job['job_id']}/cancel")
    assert r.status_code == 409
    core.tick()
    assert store.get_job(job["job_id"])["status"] == "cancelled"


def test_scheduler_recovery_requeues_lost_running_jobs(platform):
    settings, store, core, client = platform
    job = store.create_job("training", "lost", IRIS, "admin")
    store.transition_job(job["job_id"], "running", expect="queued")
    fresh = SchedulerCore(store, ThreadLauncher(settings, store), max_concurrent=1)  # a restarted scheduler
    assert job["job_id"] in fresh.recover()["requeued"]
    assert store.get_job(job["job_id"])["status"] == "queued"
    store.transition_job(job["job_id"], "cancelled")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_local_csv_and_parquet_datasets(platform, tmp_path, fmt):
    from sklearn.datasets import load_diabetes

    settings, store, core, client = platform
    frame = load_diabetes(as_frame=True).frame
    path = tmp_path / f"diabetes.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    spec = TrainingJobSpec.model_validate({
        "name": f"diabetes-{fmt}", "estimator": "sklearn.linear_model.Ridge", "hyperparameters": {"alpha": 0.5},
        "dataset": {"uri": f"file://{path}" if fmt == "csv" else str(path), "target": "target"},
        "register_as": f"diabetes-{fmt}",
    })
    res = train_sklearn(spec, settings, f"job-{fmt}", lambda *a: None)
    assert res["model_version"] == "1" and res["metrics"]["r2"] > 0.3 and res["onnx_max_abs_diff"] < 1e-3
    assert set(res["metrics"]) == {"rmse", "mae", "r2"}


def test_gates_go_on_the_model_card(platform):
    settings, store, core, client = platform
    gates = {"gates": [{"metric": "accuracy", "min": 0.5}, {"metric": "log_loss", "beat_champion_by": 0.0}]}
    spec = TrainingJobSpec.model_validate({**IRIS, "name": "gated", "register_as": "iris-card", "validation": gates})
    res = train_sklearn(spec, settings, "job-card", lambda *a: None)
    card = client.get(f"/v1/models/iris-card/versions/{res['model_version']}/card")
    assert card.status_code == 200, card.text
    report = card.json()["validation"]
    assert report["passed"] is True and [g["passed"] for g in report["gates"]] == [True, True]
    md = client.get(f"/v1/models/iris-card/versions/{res['model_version']}/card", params={"format": "markdown"})
    assert "## Validation gates" in md.text and "log_loss beat_champion_by: passed (no champion yet)" in md.text


def test_retry_a_failed_job_queues_it_again(platform):
    settings, store, core, client = platform
    r = client.post("/v1/training/jobs", json={**IRIS, "name": "retry-me",
                                               "dataset": {"uri": "builtin://iris", "target": "species"}})
    job = wait(client, core, r.json()["job_id"])
    assert job["status"] == "failed"
    again = client.post(f"/v1/jobs/{job['job_id']}/retry")
    assert again.status_code == 200 and again.json()["status"] == "queued" and again.json()["error"] is None
    done = wait(client, core, job["job_id"])
    assert done["status"] == "failed" and done["attempts"] == 2  # the same bad target fails again, recorded
    assert client.post("/v1/jobs/nope/retry").status_code == 404
    ok = client.post("/v1/training/jobs", json={**IRIS, "name": "retry-ok"}).json()["job_id"]
    assert wait(client, core, ok)["status"] == "succeeded"
    assert client.post(f"/v1/jobs/{ok}/retry").status_code == 409


def test_jobs_have_owners(platform):
    """A developer cancels or retries only the jobs it submitted (403 otherwise); an admin any."""
    settings, store, core, client = platform

    def as_(name, role):
        c = TestClient(client.app)
        c.headers["Authorization"] = f"Bearer {store.create_token(name, role, 'admin')[1]}"
        return c

    alice, bob = as_("alice", "developer"), as_("bob", "developer")
    bad = {**IRIS, "name": "owned", "dataset": {"uri": "builtin://iris", "target": "species"}}  # fails at once
    job_id = alice.post("/v1/training/jobs", json=bad).json()["job_id"]
    job = wait(client, core, job_id)
    assert job["created_by"] == "alice" and job["status"] == "failed"
    for path in (f"/v1/jobs/{job_id}/retry", f"/v1/jobs/{job_id}/cancel", f"/v1/training/jobs/{job_id}/cancel"):
        r = bob.post(path)
        assert r.status_code == 403 and r.json()["code"] == "permission_denied", (path, r.text)
        assert r.json()["details"]["owner"] == "alice"
    assert store.get_job(job_id)["attempts"] == 1  # nothing happened
    assert alice.post(f"/v1/jobs/{job_id}/retry").status_code == 200
    assert wait(client, core, job_id)["attempts"] == 2
    assert client.post(f"/v1/jobs/{job_id}/retry").status_code == 200  # the admin retries anyone's job
    assert wait(client, core, job_id)["attempts"] == 3
    queued = store.create_job("training", "queued-one", bad, "alice")  # stays queued: nobody ticks the core
    assert bob.post(f"/v1/jobs/{queued['job_id']}/cancel").status_code == 403
    assert alice.post(f"/v1/jobs/{queued['job_id']}/cancel").json()["status"] == "cancelled"


def test_dataset_paths_outside_the_data_roots_are_refused(platform, tmp_path):
    settings, store, core, client = platform
    outside = tmp_path / "d.csv"
    outside.write_text("a,target\n1,0\n")
    for uri in (str(outside), "/etc/passwd", f"file://{settings.matih_home}/matih.db"):
        r = client.post("/v1/training/jobs", json={**IRIS, "dataset": {"uri": uri, "target": "target"}})
        assert r.status_code == 422 and r.json()["details"]["field"] == "dataset.uri", r.text
    r = client.post("/v1/training/jobs", json={**IRIS, "checkpoint": {"storage_path": "/var/tmp/x"}})
    assert r.status_code == 422 and r.json()["details"]["field"] == "checkpoint.storage_path", r.text
    # inside the default data root: accepted and stored as the resolved path
    inside = settings.matih_home / "data" / "diabetes.csv"
    inside.parent.mkdir(exist_ok=True)
    from sklearn.datasets import load_diabetes

    load_diabetes(as_frame=True).frame.to_csv(inside, index=False)
    spec = {**IRIS, "name": "in-root", "estimator": "sklearn.linear_model.Ridge", "hyperparameters": {},
            "dataset": {"uri": "diabetes.csv", "target": "target"}}
    job_id = client.post("/v1/training/jobs", json=spec).json()["job_id"]
    job = wait(client, core, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["spec"]["dataset"]["uri"] == str(inside.resolve())
