"""Training jobs on the session's Ray cluster, over HTTP: every job a Ray Job started by the
JobScheduler; torch strategies with 2 workers; a Tune search; checkpoints, a killed worker,
resume; validation gates; the scheduler killed with a queue; ``ray job submit`` by hand."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import DEMO_JOB
from tests.support import wait_until

REPO = Path(__file__).resolve().parents[2]


def torch_job(name: str, strategy: str, **extra) -> dict:
    spec = {
        "name": name,
        "framework": "torch",
        "model": {"kind": "mlp", "hidden": [16, 16]},
        "dataset": {"uri": "builtin://iris", "target": "target"},
        "hyperparameters": {"epochs": 3, "lr": 0.05, "batch_size": 16},
        "strategy": strategy,
        "resources": {"num_workers": 2 if strategy != "single" else 1, "cpus_per_worker": 0.5},
        "register_as": "iris-torch",
    }
    for key, value in extra.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


def submit(platform, spec: dict) -> str:
    with platform.client() as c:
        r = c.post("/v1/training/jobs", json=spec)
        assert r.status_code == 202, r.text
        return r.json()["job_id"]


def mlflow_client(platform):
    from mlflow import MlflowClient

    return MlflowClient(platform.mlflow.uri, platform.mlflow.uri)


def versions_of_job(platform, name: str, job_id: str) -> list:
    return [mv for mv in mlflow_client(platform).search_model_versions(f"name = '{name}'")
            if (mv.tags or {}).get("matih.job_id") == job_id]


def test_sklearn_job_runs_as_a_ray_job_with_holdout_metrics(platform, iris):
    assert iris["ray_job_id"].startswith(f"matih-{iris['job_id']}-")
    metrics = iris["result"]["metrics"]
    assert {"accuracy", "f1", "roc_auc", "log_loss"} <= set(metrics) and metrics["accuracy"] > 0.8
    with platform.client() as c:
        job = c.get(f"/v1/training/jobs/{iris['job_id']}").json()
    assert job["result"]["validation"]["passed"] is True and "holdout metrics" in job["logs"]


@pytest.mark.parametrize("strategy", ["data_parallel", "model_parallel", "pipeline_parallel"])
def test_torch_strategies_with_two_workers(platform, strategy):
    job_id = submit(platform, torch_job(f"iris-{strategy}", strategy))
    job = platform.wait_job(job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], job.get("logs"))
    assert len(job["progress"]["worker_pids"]) == 2 and job["progress"]["epoch"] == 3
    assert job["result"]["metrics"]["accuracy"] > 0.5 and job["result"]["onnx_max_abs_diff"] < 1e-3
    assert len(versions_of_job(platform, "iris-torch", job_id)) == 1


def test_torch_model_serves_through_an_endpoint(platform):
    job_id = submit(platform, torch_job("iris-single", "single", hyperparameters={"epochs": 20}))
    job = platform.wait_job(job_id, timeout=300)
    assert job["status"] == "succeeded", (job["error"], job.get("logs"))
    version = job["result"]["model_version"]
    with platform.client() as c:
        r = c.post("/v1/endpoints", json={"name": "iris-torch", "target": f"iris-torch/{version}"})
        assert r.status_code == 201, r.text
        out = c.post("/v1/endpoints/iris-torch/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]],
                                                               "return_probabilities": True})
        assert out.status_code == 200, out.text
        assert out.json()["predictions"][0] in (0, 1, 2)
        assert abs(sum(out.json()["probabilities"][0]) - 1) < 1e-4


def test_tune_search_of_eight_trials_with_asha(platform):
    spec = {**DEMO_JOB, "name": "iris-tune", "register_as": "iris-tuned",
            "tune": {"search_space": {"C": {"loguniform": [0.01, 10]}}, "num_samples": 8, "scheduler": "asha",
                     "metric": "accuracy", "mode": "max", "max_concurrent": 2, "cpus_per_trial": 0.25}}
    job = platform.wait_job(submit(platform, spec), timeout=300)
    assert job["status"] == "succeeded", (job["error"], job.get("logs"))
    trials = job["result"]["trials"]
    assert len(trials) == 8 and all("C" in t["config"] for t in trials)
    assert "C" in job["result"]["best_config"]
    children = mlflow_client(platform).search_runs(
        [mlflow_client(platform).get_run(job["result"]["run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{job['result']['run_id']}'",
    )
    assert len(children) == 8
    assert job["result"]["model_version"] == "1"


def test_validation_gates_decide_registration_and_challenger(platform):
    base = {**DEMO_JOB, "register_as": "iris-gates"}
    strict = {**base, "name": "gates-strict", "validation": {"gates": [{"metric": "accuracy", "min": 1.01}]}}
    job = platform.wait_job(submit(platform, strict))
    assert job["status"] == "failed" and job["error"].startswith("validation_failed")
    assert job["result"]["validation"]["passed"] is False and "model_version" not in job["result"]
    assert versions_of_job(platform, "iris-gates", job["job_id"]) == []

    gates = {"gates": [{"metric": "accuracy", "min": 0.8}, {"metric": "accuracy", "beat_champion_by": 0.0}]}
    first = platform.wait_job(submit(platform, {**base, "name": "gates-first", "validation": gates}))
    assert first["status"] == "succeeded", (first["error"], first.get("logs"))
    assert first["result"]["aliases"] == ["champion"] and first["result"]["validation"]["champion"] is None
    second = platform.wait_job(submit(platform, {**base, "name": "gates-second", "validation": gates,
                                                  "hyperparameters": {"max_iter": 300, "C": 2.0}}))
    assert second["status"] == "succeeded", (second["error"], second.get("logs"))
    report = second["result"]["validation"]
    assert report["champion"]["version"] == first["result"]["model_version"]
    assert report["champion"]["metrics"]["accuracy"] > 0.8
    assert second["result"]["aliases"] == ["challenger"]
    with platform.client() as c:
        r = c.get(f"/v1/models/iris-gates/versions/{second['result']['model_version']}/card")
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["validation"]["passed"] is True and len(card["validation"]["gates"]) == 2
    assert card["validation"]["champion"]["version"] == first["result"]["model_version"]


def test_bad_specs_and_gpu_requests_are_refused(platform):
    with platform.client() as c:
        r = c.post("/v1/training/jobs", json={**torch_job("x", "data_parallel"), "strategy": "tensor_parallel"})
        assert r.status_code == 422 and "data_parallel" in r.json()["error"]
        r = c.post("/v1/training/jobs", json=torch_job("x", "data_parallel", resources={"gpus_per_worker": 1}))
        assert r.status_code == 422 and "GPU" in r.json()["error"] and "none" in r.json()["error"]
        r = c.post("/v1/training/jobs", json=torch_job("x", "data_parallel", resources={"num_workers": 64}))
        assert r.status_code == 422 and "CPUs" in r.json()["error"]
        gpus = c.get("/v1/gpus").json()
        assert gpus["gpus_total"] == 0 and gpus["devices"] == []


def test_killed_worker_resumes_from_its_checkpoint_and_registers_once(platform):
    spec = torch_job("iris-kill", "data_parallel", hyperparameters={"epochs": 8, "epoch_sleep_s": 0.6},
                     failure={"max_failures": 1}, checkpoint={"keep_best": 2, "metric": "val_loss", "mode": "min"},
                     register_as="iris-kill")
    job_id = submit(platform, spec)
    with platform.client() as c:
        def two_checkpoints():
            job = c.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] in ("queued", "running"), job
            cps = c.get(f"/v1/training/jobs/{job_id}/checkpoints").json()["items"]
            return job if len(cps) >= 2 and job["progress"].get("worker_pids") else None

        job = wait_until(two_checkpoints, timeout=240)
        os.kill(job["progress"]["worker_pids"][-1], signal.SIGKILL)
        done = platform.wait_job(job_id, timeout=300)
        assert done["status"] == "succeeded", (done["error"], done.get("logs"))
        assert done["progress"]["restarts"] >= 1 and done["progress"]["epoch"] == 8
        cps = c.get(f"/v1/training/jobs/{job_id}/checkpoints").json()["items"]
        # Ray Train keeps the 2 best and the latest; a checkpoint written as the worker was killed
        # may stay on disk without Ray ever tracking it. Far fewer than the 8 epochs' in any case.
        assert 1 <= len(cps) <= 4 and all("val_loss" in cp["metrics"] for cp in cps), cps
    assert len(versions_of_job(platform, "iris-kill", job_id)) == 1

    # Resume the ended job from its best kept checkpoint: a new job that starts from those weights.
    with platform.client() as c:
        r = c.post(f"/v1/training/jobs/{job_id}/resume", json={"checkpoint": cps[0]["name"]})
        assert r.status_code == 202, r.text
        resumed = platform.wait_job(r.json()["job_id"], timeout=300)
        assert resumed["status"] == "succeeded", (resumed["error"], resumed.get("logs"))
        assert resumed["spec"]["checkpoint"]["resume_from"] == cps[0]["path"]
        assert resumed["progress"]["epoch"] == 8 and "resum" in resumed["logs"].lower()
        assert c.post("/v1/training/jobs/nope/resume").status_code == 404


def test_scheduler_killed_with_a_queue_loses_nothing_and_runs_nothing_twice(platform, iris):
    import ray

    jobs = [submit(platform, {**DEMO_JOB, "name": f"queued-{i}", "register_as": "iris-queue"}) for i in range(3)]
    with platform.client() as c:
        wait_until(lambda: c.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "running", timeout=120, every=0.1)
    scheduler = ray.get_actor("job_scheduler", namespace="matih")
    ray.kill(scheduler, no_restart=False)  # the actor restarts (max_restarts=-1) and rebuilds from the store
    finished = [platform.wait_job(j, timeout=300) for j in jobs]
    assert [j["status"] for j in finished] == ["succeeded"] * 3, [(j["error"], j.get("logs")) for j in finished]
    assert all(j["attempts"] == 1 for j in finished)
    for j in finished:
        assert len(versions_of_job(platform, "iris-queue", j["job_id"])) == 1
        runs = mlflow_client(platform).search_runs(
            [mlflow_client(platform).get_run(j["result"]["run_id"]).info.experiment_id],
            filter_string=f"tags.`matih.job_id` = '{j['job_id']}' and attributes.run_name = '{j['name']}'",
        )
        assert len(runs) == 1
    recovered = ray.get(ray.get_actor("job_scheduler", namespace="matih").recovered.remote())
    assert recovered is not None


def _documented_ray_job_submit() -> str:
    """The shell block of docs/training.md section 5, as a user copies it."""
    text = (REPO / "docs" / "training.md").read_text()
    section = text[text.index("## 5. Running a spec by hand"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return block[:block.index("```")]


def test_documented_ray_job_submit_works_as_written(platform, tmp_path):
    """docs/training.md's `ray job submit` line, run by bash in a checkout (the platform's
    packages, a `.venv` link to this interpreter's environment) with only the dashboard's
    port changed: from a shell that has no RAY_AUTH_MODE, against a cluster with Ray's token
    auth on, as the cluster `serve run` starts has."""
    import httpx

    from actors.job_scheduler import find_job_scheduler

    # Like a cluster `serve run` starts, the session's cluster (ray.init) has token auth on.
    assert httpx.get(f"{platform.dashboard}/api/jobs/", timeout=10).status_code == 401
    checkout = tmp_path / "checkout"
    for name in ("app", "actors", "deployments", "configs"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / ".venv").symlink_to(sys.prefix)
    script = _documented_ray_job_submit()
    assert "http://127.0.0.1:8265" in script and "ray job submit" in script
    script = script.replace("http://127.0.0.1:8265", platform.dashboard)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    out = subprocess.run(["bash", "-ec", script], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("job rayjob-"))
    job_id = line.split()[1].rstrip(":")
    with platform.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["created_by"].startswith("ray-job:")
    assert job["result"]["model_name"] == "iris-by-hand" and job["result"]["aliases"] == ["champion"]
    # The job took the platform's settings from the JobScheduler, which answers no credential.
    import ray

    shared = json.dumps(ray.get(find_job_scheduler().settings.remote()))
    assert platform.s3.settings()["s3_secret_key"] not in shared and platform.admin_token not in shared


def test_scheduled_jobs_get_their_credentials_in_their_environment_only(platform, iris):
    """The JobScheduler hands a job its credentials as runtime_env env_vars (never the admin token)."""
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(platform.dashboard).get_job_info(iris["ray_job_id"])
    env = info.runtime_env["env_vars"]
    assert env["S3_SECRET_KEY"] == platform.s3.settings()["s3_secret_key"]
    assert env["MLFLOW_TRACKING_URI"] == platform.settings.mlflow_tracking_uri
    assert env["DATABASE_URL"] == platform.settings.database_url
    assert "MATIH_ADMIN_TOKEN" not in env


def test_job_paths_are_confined_and_jobs_have_owners(platform, iris):
    with platform.client() as c:
        r = c.post("/v1/training/jobs", json={**DEMO_JOB, "dataset": {"uri": "/etc/passwd", "target": "target"}})
        assert r.status_code == 422 and r.json()["code"] == "unsafe_path", r.text
        assert r.json()["details"]["field"] == "dataset.uri"
        token = c.post("/v1/tokens", json={"name": "jobs-dev", "role": "developer"}).json()["token"]
    with platform.client(token) as dev:
        r = dev.post(f"/v1/jobs/{iris['job_id']}/retry")  # the admin's job
        assert r.status_code == 403 and r.json()["details"]["owner"] == "admin", r.text
        assert dev.post(f"/v1/training/jobs/{iris['job_id']}/cancel").status_code == 403
