"""Chaos for the detached actors: each is killed (``ray.kill(..., no_restart=False)``: Ray
restarts it, as after a node failure) with work in flight, and must rebuild from its stores.

- JobScheduler and GPUManager, killed while a torch job trains and another waits in the queue:
  both jobs end succeeded, each on its one Ray Job (nothing lost, nothing run twice).
- RegistryCache, killed as an alias moves to a new version: the endpoint serves the new
  version within the resolution TTL and never goes back to the old one.

Each test is bounded in time and prints its figures (restart times, jobs)."""

from __future__ import annotations

import time

import pytest

from app.cli import DEMO_JOB
from tests.support import kill_and_time, skops_iris_model, wait_until

pytestmark = pytest.mark.integration
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def test_scheduler_and_gpu_manager_killed_mid_job(platform, iris):
    import ray
    from ray.job_submission import JobSubmissionClient

    torch_spec = {
        "name": "chaos-train", "framework": "torch", "model": {"kind": "mlp", "hidden": [8]},
        "dataset": {"uri": "builtin://iris", "target": "target"},
        "hyperparameters": {"epochs": 4, "lr": 0.05, "batch_size": 16, "epoch_sleep_s": 1.0},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5}, "register_as": "chaos-train",
    }
    with platform.client() as c:
        r = c.post("/v1/training/jobs", json=torch_spec)
        assert r.status_code == 202, r.text
        training = r.json()["job_id"]

        def mid_epoch():
            job = c.get(f"/v1/jobs/{training}").json()
            assert job["status"] in ("queued", "running"), job
            return job if job["status"] == "running" and (job["progress"].get("epoch") or 0) >= 1 else None

        wait_until(mid_epoch, timeout=240, every=0.2)
        scheduler_s = kill_and_time(
            "job_scheduler", lambda a: ray.get(a.recovered.remote(), timeout=5) is not None
        )
        r = c.post("/v1/training/jobs", json={**DEMO_JOB, "name": "chaos-queued", "register_as": "chaos-queued"})
        assert r.status_code == 202, r.text
        queued = r.json()["job_id"]
        gpu_s = kill_and_time("gpu_manager", lambda a: ray.get(a.ping.remote(), timeout=5))
        gpus = c.get("/v1/gpus")
        assert gpus.status_code == 200 and gpus.json()["gpus_total"] == 0, gpus.text  # served by the new incarnation
        recovered = ray.get(ray.get_actor("job_scheduler", namespace="matih").recovered.remote())
        assert training in recovered["reattached"], recovered  # found again in Ray, not started again

    finished = {j: platform.wait_job(j, timeout=300) for j in (training, queued)}
    for job in finished.values():
        assert job["status"] == "succeeded", (job["name"], job["error"], job.get("logs"))
        assert job["attempts"] == 1, job
    ray_jobs = JobSubmissionClient(platform.dashboard).list_jobs()
    per_job = {j: [r.submission_id for r in ray_jobs if (r.metadata or {}).get("matih_job_id") == j] for j in finished}
    assert all(len(ids) == 1 for ids in per_job.values()), per_job  # each job ran on exactly one Ray Job
    print(f"\nCHAOS job_scheduler: restart_s={scheduler_s:.2f} reattached={recovered['reattached']} "
          f"requeued={recovered['requeued']} jobs={len(finished)} succeeded, attempts=1 each, ray_jobs={per_job}")
    print(f"CHAOS gpu_manager: restart_s={gpu_s:.2f} inventory served again")


def test_registry_cache_killed_around_an_alias_change(platform):
    import ray

    with platform.client() as c:
        for _ in range(2):
            r = c.post("/v1/models/chaos-alias/versions", files={"file": ("m", skops_iris_model())},
                       data={"format": "skops"})
            assert r.status_code == 201, r.text
        assert c.put("/v1/models/chaos-alias/aliases/live", json={"version": "1"}).status_code == 200
        assert c.post("/v1/endpoints", json={"name": "chaos-alias", "target": "chaos-alias@live"}).status_code == 201
        for _ in range(3):  # resolved and cached in the gateway and the RegistryCache
            out = c.post("/v1/endpoints/chaos-alias/predict", json=ROW)
            assert out.status_code == 200 and out.json()["model_version"] == "1", out.text

        ray.kill(ray.get_actor("registry_cache", namespace="matih"), no_restart=False)
        killed = time.monotonic()
        moved = c.put("/v1/models/chaos-alias/aliases/live", json={"version": "2"})  # right after the kill
        assert moved.status_code == 200, moved.text
        alias_s = time.monotonic() - killed
        seen, failures = [], 0
        deadline = killed + 30
        while time.monotonic() < deadline:
            out = c.post("/v1/endpoints/chaos-alias/predict", json=ROW)
            if out.status_code != 200:
                assert out.status_code == 503, out.text  # restarting: unavailable for a moment, never a 500
                failures += 1
            else:
                seen.append((time.monotonic() - killed, out.json()["model_version"]))
                if out.json()["model_version"] == "2":
                    break
            time.sleep(0.05)
        assert seen and seen[-1][1] == "2", seen
        new_after_s = seen[-1][0]  # includes loading version 2 into the ModelServer (seconds)
        # Stale: the old version answered after the alias moved and the resolution TTL passed.
        stale = [(t, v) for t, v in seen if v == "1" and t > alias_s + platform.settings.serving.resolve_ttl_s]
        assert not stale, seen
        for _ in range(20):  # and it stays on the new version: nothing stale comes back
            out = c.post("/v1/endpoints/chaos-alias/predict", json=ROW)
            assert out.status_code == 200 and out.json()["model_version"] == "2", out.text
        health = ray.get(ray.get_actor("registry_cache", namespace="matih").health.remote(), timeout=30)
    print(f"\nCHAOS registry_cache: alias moved {alias_s:.2f}s after the kill; endpoint on the new version "
          f"{new_after_s:.2f}s after the kill; {failures} requests refused meanwhile; "
          f"{len(seen)} answers until then (versions {[v for _, v in seen]}), {len(stale)} stale; "
          f"epoch after restart {health['epoch']}")
