"""The training job spec, validation gates, resource needs and the scheduler's queue policy."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from app.cli import DEMO_JOB
from app.errors import Conflict, InvalidInput
from app.jobs.resources import check_fits, job_needs
from app.jobs.scheduler import SchedulerCore
from app.settings import load_settings
from app.store import MetadataStore
from app.training.spec import TrainingJobSpec
from app.training.validation import check_gates, classification_metrics, regression_metrics

TORCH = {"name": "t", "framework": "torch", "dataset": {"uri": "builtin://iris", "target": "target"}}


def error_of(spec: dict) -> str:
    with pytest.raises(ValidationError) as info:
        TrainingJobSpec.model_validate(spec)
    return str(info.value)


def test_the_demo_job_and_legacy_fields_still_parse():
    spec = TrainingJobSpec.model_validate({**DEMO_JOB, "dataset": {**DEMO_JOB["dataset"], "test_size": 0.3, "seed": 1},
                                           "resources": {"num_cpus": 0.5}})
    assert spec.dataset.split.test_size == 0.3 and spec.dataset.split.seed == 1
    assert spec.resources.cpus_per_worker == 0.5 and spec.strategy == "single"


@pytest.mark.parametrize("change, fragment", [
    ({"strategy": "tensor_parallel"}, "data_parallel"),
    ({"framework": "jax"}, "'sklearn' or 'torch'"),
    ({"strategy": "data_parallel"}, "needs framework 'torch'"),
    ({"resources": {"num_workers": 2}}, "num_workers = 1"),
    ({"estimator": None}, "needs `estimator`"),
    ({"validation": {"gates": [{"metric": "accuracy"}]}}, "exactly one of min, max, beat_champion_by"),
    ({"validation": {"gates": [{"metric": "precision", "min": 1}]}}, "allowed: accuracy, f1"),
    ({"tune": {"search_space": {"C": {"loguniform": [0, 1]}}}}, "low must be > 0"),
    ({"tune": {"search_space": {"C": {"uniform": [1, 2], "choice": [1]}}}}, "exactly one of uniform"),
    ({"tune": {"search_space": {"C": {"grid": [1]}}, "scheduler": "hyperband"}}, "'asha', 'median' or 'pbt'"),
])
def test_bad_sklearn_specs_name_the_field_and_the_allowed_values(change, fragment):
    assert fragment in error_of({**DEMO_JOB, **change})


@pytest.mark.parametrize("change, fragment", [
    ({"resources": {"num_workers": 2}}, "strategy 'single' runs one worker"),
    ({"strategy": "pipeline_parallel", "model": {"kind": "cnn"}}, "set model.kind to 'mlp'"),
    ({"strategy": "pipeline_parallel", "model": {"hidden": [8]}, "resources": {"num_workers": 3}}, "hidden layers"),
    ({"hyperparameters": {"learning_rate": 0.1}}, "allowed: epochs, lr"),
    ({"model": {"kind": "tab_transformer", "d_model": 30, "heads": 4}}, "multiple of heads"),
    ({"estimator": "sklearn.svm.SVC"}, "torch jobs name a `model`"),
])
def test_bad_torch_specs(change, fragment):
    assert fragment in error_of({**TORCH, **change})


def test_torch_defaults_and_hyperparameters():
    spec = TrainingJobSpec.model_validate({**TORCH, "strategy": "data_parallel", "resources": {"num_workers": 2},
                                           "hyperparameters": {"epochs": 2}})
    assert spec.model.kind == "mlp" and spec.torch_hparams().epochs == 2 and spec.torch_hparams().lr > 0


def test_classification_and_regression_metrics():
    y = np.array([0, 1, 2, 1])
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    m = classification_metrics(y, proba.argmax(1), proba, [0, 1, 2])
    assert m["accuracy"] == 0.75 and 0 < m["f1"] < 1 and 0.5 < m["roc_auc"] <= 1 and m["log_loss"] > 0
    b = classification_metrics(np.array(["a", "b", "b"]), np.array(["a", "b", "a"]),
                               np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), ["a", "b"])
    assert b["roc_auc"] == 1.0 and b["f1"] == pytest.approx(2 / 3)
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert r["mae"] == pytest.approx(1 / 3) and r["rmse"] == pytest.approx(np.sqrt(1 / 3)) and r["r2"] == 0.5


def test_gates_min_max_and_beat_the_champion():
    spec = TrainingJobSpec.model_validate({**DEMO_JOB, "validation": {"gates": [
        {"metric": "accuracy", "min": 0.9}, {"metric": "log_loss", "max": 0.5},
        {"metric": "accuracy", "beat_champion_by": 0.01}, {"metric": "log_loss", "beat_champion_by": 0.0},
    ]}}).validation
    new = {"accuracy": 0.95, "log_loss": 0.2}
    assert check_gates(spec, new, None).passed  # no champion: the beat gates pass
    champ = {"version": "3", "metrics": {"accuracy": 0.945, "log_loss": 0.3}}
    report = check_gates(spec, new, champ)
    assert [g.passed for g in report.gates] == [True, True, False, True]
    assert "does not beat" in report.failures()[0]
    report = check_gates(spec, {"accuracy": 0.95}, {"version": "1", "metrics": None})
    assert not report.gates[1].passed and "no log_loss" in report.gates[1].note
    assert report.as_dict()["passed"] is False


def test_job_needs_and_refusals():
    settings = load_settings("local")
    ddp = TrainingJobSpec.model_validate({**TORCH, "strategy": "data_parallel",
                                          "resources": {"num_workers": 2, "cpus_per_worker": 0.5}}).model_dump()
    needs = job_needs("training", ddp, settings)
    assert (needs.driver_cpus, needs.cpus, needs.gpus) == (0.0, 1.0, 0.0)
    sk = job_needs("training", TrainingJobSpec.model_validate(DEMO_JOB).model_dump(), settings)
    assert sk.driver_cpus == sk.cpus == settings.jobs.num_cpus
    gpu = TrainingJobSpec.model_validate({**TORCH, "resources": {"gpus_per_worker": 0.5}}).model_dump()
    with pytest.raises(InvalidInput, match="has none"):
        check_fits(job_needs("training", gpu, settings), {"CPU": 2.0}, settings)
    with pytest.raises(InvalidInput, match="whole cluster has 0.5"):
        check_fits(needs, {"CPU": 0.5}, settings)
    check_fits(job_needs("training", gpu, settings), {"CPU": 2.0}, load_settings("local", jobs={"unschedulable": "queue"}))


class _Handle:
    def __init__(self, ended=False):
        self.ended, self.cancelled = ended, False

    def done(self):
        return self.ended

    def cancel(self):
        self.cancelled = True

    def describe_end(self):
        return "exit 137"


class _Launcher:
    """Launches nothing: records what the scheduler asked, as a Ray launcher would be asked."""

    def __init__(self):
        self.launched, self.known, self.free, self.released = [], {}, 10.0, []

    def admit(self, job):
        need = job["spec"].get("cpus", 1)
        return None if need <= self.free else f"{need} CPUs (free now: {self.free})"

    def launch(self, job):
        self.launched.append(job["job_id"])
        self.known[job["job_id"]] = _Handle()
        return self.known[job["job_id"]]

    def attach(self, job):
        return self.known.get(job["job_id"])

    def release(self, job_id):
        self.released.append(job_id)


@pytest.fixture
def store(tmp_path):
    s = MetadataStore(f"sqlite:///{tmp_path}/q.db")
    s.migrate()
    return s


def test_admission_waits_with_a_reason_and_lets_smaller_jobs_by(store):
    launcher = _Launcher()
    core = SchedulerCore(store, launcher, max_concurrent=2)
    assert core.idle  # nothing to watch: the driver may poll slowly
    big = store.create_job("training", "big", {"cpus": 50}, "a", priority=5)
    small = store.create_job("training", "small", {"cpus": 1}, "a")
    assert core.tick() == [small["job_id"]]
    assert store.get_job(big["job_id"])["progress"]["waiting_for"].startswith("50 CPUs")
    assert not core.idle
    launcher.free = 100
    assert core.tick() == [big["job_id"]]


def test_restart_reattaches_running_ray_jobs_and_requeues_unknown_ones(store):
    launcher = _Launcher()
    core = SchedulerCore(store, launcher, max_concurrent=3)
    a = store.create_job("training", "a", {}, "x")
    b = store.create_job("training", "b", {}, "x")
    core.tick()
    store.transition_job(store.create_job("training", "c", {}, "x")["job_id"], "running")  # never launched
    fresh = SchedulerCore(store, launcher, max_concurrent=3)  # the actor restarted
    found = fresh.recover()
    assert sorted(found["reattached"]) == sorted([a["job_id"], b["job_id"]]) and len(found["requeued"]) == 1
    launcher.known[a["job_id"]].ended = True  # its Ray Job died without recording an end
    fresh.tick()
    job = store.get_job(a["job_id"])
    assert job["status"] == "failed" and "exit 137" in job["error"] and a["job_id"] in launcher.released
    assert launcher.launched.count(b["job_id"]) == 1  # re-attached, never launched again
    fresh.cancel(b["job_id"], "x")
    assert launcher.known[b["job_id"]].cancelled


def test_a_launcher_that_is_not_ready_leaves_the_job_queued(store):
    from app.jobs.scheduler import LaunchDeferred

    class NotReady(_Launcher):
        def launch(self, job):
            raise LaunchDeferred("the job agent (not available yet)")

    core = SchedulerCore(store, NotReady(), max_concurrent=1)
    job = store.create_job("training", "j", {}, "x")
    assert core.tick() == []
    after = store.get_job(job["job_id"])
    assert after["status"] == "queued" and "job agent" in after["progress"]["waiting_for"]


@pytest.mark.parametrize("hp, fragment", [({"lr": -1}, "hyperparameters.lr"), ({"optimizer": "rmsprop"}, "'adam' or 'sgd'")])
def test_torch_hyperparameter_values_are_checked_in_the_spec(hp, fragment):
    assert fragment in error_of({**TORCH, "hyperparameters": hp})


def test_s3_datasets_need_the_settings_and_exist():
    from app.datasets import load_dataset

    with pytest.raises(InvalidInput, match="S3 settings"):
        load_dataset("s3://bucket/data.parquet")
    with pytest.raises(InvalidInput, match="unknown format"):
        load_dataset("s3://bucket/data.txt", load_settings("local"))


# -- paths confined to the data roots ----------------------------------------------------------
def _paths_spec(dataset: str, **checkpoint) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate({**TORCH, "dataset": {"uri": dataset, "target": "target"},
                                           "checkpoint": checkpoint})


def test_job_paths_resolve_inside_the_data_roots(tmp_path):
    import os

    from app.training.spec import check_spec_paths

    settings = load_settings("local", matih_home=str(tmp_path))
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.csv").write_text("a,target\n1,0\n")
    os.symlink("/etc", data / "etc-link")
    assert settings.storage.data_roots == [str(data), str(tmp_path / "artifacts")]

    ok = check_spec_paths(_paths_spec("d.csv", storage_path=str(tmp_path / "artifacts" / "ckpt"),
                                      resume_from=str(tmp_path / "train_results" / "job" / "checkpoint_000001")),
                          settings)
    assert ok.dataset.uri == os.path.realpath(data / "d.csv")  # relative: under the first data root
    assert check_spec_paths(_paths_spec("builtin://iris"), settings).dataset.uri == "builtin://iris"

    for dataset, ckpt, field in [
        ("/etc/passwd", {}, "dataset.uri"),
        (f"file://{data}/../matih.db", {}, "dataset.uri"),
        (f"{data}/etc-link/passwd", {}, "dataset.uri"),
        ("s3://other-bucket/d.parquet", {}, "dataset.uri"),
        ("http://example.com/d.csv", {}, "dataset.uri"),
        ("d.csv", {"storage_path": "/tmp/elsewhere"}, "checkpoint.storage_path"),
        ("d.csv", {"resume_from": "/root/checkpoint_000001"}, "checkpoint.resume_from"),
    ]:
        with pytest.raises(InvalidInput) as info:
            check_spec_paths(_paths_spec(dataset, **ckpt), settings)
        assert info.value.code == "unsafe_path" and info.value.details["field"] == field, (dataset, ckpt)


def test_s3_data_roots_and_buckets(tmp_path):
    from app.training.spec import check_spec_paths

    settings = load_settings("local", matih_home=str(tmp_path), artifact_root="s3://artifacts/mlflow",
                             storage={"data_roots": ["s3://lake/training"], "allowed_buckets": ["s3://scratch"]})
    assert check_spec_paths(_paths_spec("s3://lake/training/d.parquet"), settings).dataset.uri.endswith("d.parquet")
    check_spec_paths(_paths_spec("s3://scratch/any/where.csv"), settings)
    for bad in ("s3://lake/other/d.parquet", "s3://artifacts/mlflow/d.parquet", f"{tmp_path}/data/d.csv"):
        with pytest.raises(InvalidInput):
            check_spec_paths(_paths_spec(bad), settings)
    # defaults: the artifact root's bucket is allowed when the artifact root is on S3
    default = load_settings("local", matih_home=str(tmp_path), artifact_root="s3://artifacts/mlflow")
    assert default.storage.allowed_buckets == ["artifacts"]
    check_spec_paths(_paths_spec("s3://artifacts/datasets/d.parquet"), default)


# -- launches that raise, runners whose end cannot be recorded ----------------------------------
def test_a_launch_that_raised_after_ray_accepted_it_is_reconciled_not_failed(store):
    class AcceptedThenTimedOut(_Launcher):
        def launch(self, job):
            super().launch(job)  # Ray has it ...
            raise TimeoutError("read timed out")  # ... but the answer was lost

    launcher = AcceptedThenTimedOut()
    core = SchedulerCore(store, launcher, max_concurrent=2)
    job = store.create_job("training", "j", {}, "x")
    assert core.tick() == [job["job_id"]]
    assert store.get_job(job["job_id"])["status"] == "running" and job["job_id"] in core.running
    assert launcher.launched == [job["job_id"]]
    launcher.known[job["job_id"]].ended = True
    core.tick()  # reaped as any other job: exactly one Ray Job ran it
    assert launcher.launched == [job["job_id"]]

    class Refused(_Launcher):
        def launch(self, job):
            raise RuntimeError("runtime_env is not valid")  # Ray never had it

    core = SchedulerCore(store, Refused(), max_concurrent=1)
    bad = store.create_job("training", "bad", {}, "x")
    core.tick()
    failed = store.get_job(bad["job_id"])
    assert failed["status"] == "failed" and "runtime_env" in failed["error"]


def test_no_job_stays_running_without_a_handle(store):
    """A launch whose outcome Ray cannot tell leaves the job running; the sweep settles it:
    attached when its Ray Job exists, else queued again (failed after max_attempts)."""

    class Unreachable(_Launcher):
        down = True

        def launch(self, job):
            raise ConnectionError("dashboard unreachable")

        def attach(self, job):
            if self.down:
                raise ConnectionError("dashboard unreachable")
            return super().attach(job)

    launcher = Unreachable()
    core = SchedulerCore(store, launcher, max_concurrent=1, max_attempts=2)
    job = store.create_job("training", "j", {}, "x")
    core.tick()
    assert store.get_job(job["job_id"])["status"] == "running" and not core.running
    assert core.sweep() == {"reattached": [], "requeued": []}  # still cannot ask: left as it is
    launcher.down = False
    assert core.sweep()["requeued"] == [job["job_id"]]  # Ray never had it: queued again
    assert store.get_job(job["job_id"])["status"] == "queued"
    launcher.launch = _Launcher.launch.__get__(launcher)  # Ray is back: it starts for real
    assert core.tick() == [job["job_id"]] and store.get_job(job["job_id"])["attempts"] == 2
    # a job recorded running by hand meanwhile (ray job submit) is attached by the sweep
    by_hand = store.create_job("training", "h", {}, "x", running_as="raysubmit_1")
    launcher.known[by_hand["job_id"]] = _Handle()
    assert core.sweep()["reattached"] == [by_hand["job_id"]]
    store.transition_job(by_hand["job_id"], "succeeded")  # it recorded its end; its handle cannot tell
    core.sweep()
    assert by_hand["job_id"] not in core.running  # the slot is free again
    # lost with max_attempts used up: failed, not queued forever
    store.transition_job(job["job_id"], "cancelled")
    core.running.pop(job["job_id"])
    lost = store.create_job("training", "lost", {}, "x")
    store.transition_job(lost["job_id"], "running")
    store.transition_job(lost["job_id"], "queued")
    store.transition_job(lost["job_id"], "running")
    assert core.sweep()["requeued"] == []
    assert "not retried again" in store.get_job(lost["job_id"])["error"]


class _Switch:
    """A TCP proxy in front of PostgreSQL that can be switched off: while off it drops every
    connection, as a database restart or a network cut would."""

    def __init__(self, port: int):
        import socket
        import threading

        self.target, self.up, self.pairs = port, True, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                try:
                    sock.close()
                except OSError:
                    pass

    def off(self):
        self.up = False
        for pair in self.pairs:
            for sock in pair:
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
        self.pairs.clear()

    def close(self):
        self.server.close()
        self.off()


@pytest.mark.postgres
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_the_runner_retries_recording_its_end(tmp_path, store_url):
    """The job's work is done but PostgreSQL is briefly unreachable: the final transition is
    retried until it goes through, and the job ends succeeded exactly once."""
    import threading
    import time
    from urllib.parse import urlsplit

    from app.jobs.runner import _finish

    pg = urlsplit(store_url)
    switch = _Switch(pg.port or 5432)
    url = f"postgresql+psycopg://{pg.username}@127.0.0.1:{switch.port}{pg.path}"
    settings = load_settings("local", matih_home=str(tmp_path), database_url=url, database={"connect_timeout_s": 2})
    store = MetadataStore.from_settings(settings)
    try:
        store.migrate()
        job = store.create_job("training", "finish-retry", {}, "x")
        store.transition_job(job["job_id"], "running")
        switch.off()
        threading.Timer(2.0, lambda: setattr(switch, "up", True)).start()
        started = time.monotonic()
        done = _finish(store, job["job_id"], "succeeded", 30, result={"ok": True})
        assert time.monotonic() - started >= 1.5  # it waited for the store to come back
        assert done["status"] == "succeeded" and done["result"] == {"ok": True}
        audit, _ = store.list_audit(resource_type="job", limit=1000)
        assert [a["action"] for a in audit if a["resource_id"] == job["job_id"]].count("job.succeeded") == 1
        with pytest.raises(Conflict):  # recorded once: a further try is refused, not applied twice
            store.transition_job(job["job_id"], "succeeded", expect="running")
    finally:
        store.dispose()
        switch.close()


def test_ray_job_api_calls_are_bounded_and_retried():
    """A job API that accepts connections and never answers: every request times out after
    jobs.ray_api_timeout_s and is tried jobs.ray_api_attempts times, then raises."""
    import socket
    import threading
    import time

    from actors.job_scheduler import job_client

    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(server.accept()[0])  # held open, never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(OSError):
            job_client(f"http://127.0.0.1:{server.getsockname()[1]}", timeout_s=0.3, attempts=3)
        elapsed = time.monotonic() - started
        assert len(accepted) == 3 and 0.9 <= elapsed < 10, (len(accepted), elapsed)
    finally:
        server.close()
        for conn in accepted:
            conn.close()
