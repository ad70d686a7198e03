"""The GPU inventory without Ray: NVML absent, reservations with fractions against fixed Ray
resources, the request policies, and GET /v1/gpus on an in-process API."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.errors import Conflict, InvalidInput
from app.gpus import GpuInventory, GpuUnavailable, check_request, read_nvml_devices

TWO_GPUS = {"CPU": 16.0, "GPU": 2.0}


def _nvml_works() -> bool:
    return read_nvml_devices() is not None


# -- devices ---------------------------------------------------------------------------------
def test_without_nvml_the_inventory_lists_no_devices():
    inv = GpuInventory(use_nvml=False)
    assert inv.devices() == []
    snap = inv.snapshot({"CPU": 2.0}, {"CPU": 2.0})
    assert snap == {"gpus_total": 0.0, "gpus_available": 0.0, "devices": [], "reservations": [], "nvml": False}


@pytest.mark.skipif(_nvml_works(), reason="this machine has a working NVML")
def test_a_machine_without_nvml_reports_none():
    inv = GpuInventory()  # NVML is tried: the package may be missing, or the driver
    assert inv.devices() == []
    assert inv.snapshot({}, {})["nvml"] is False


@pytest.mark.skipif(not _nvml_works(), reason="no NVML on this machine")
def test_nvml_devices_have_their_fields():
    devices = GpuInventory().devices()
    for i, dev in enumerate(devices):
        assert dev["index"] == i and dev["name"] and dev["memory_total_mib"] > 0


# -- reservations ----------------------------------------------------------------------------
def test_fractional_reservations_share_gpus_until_they_are_used_up():
    inv = GpuInventory(use_nvml=False)
    for n in range(4):
        inv.reserve(f"job-{n}", 0.5, TWO_GPUS, TWO_GPUS)
    snap = inv.snapshot(TWO_GPUS, TWO_GPUS)
    assert snap["gpus_total"] == 2.0 and snap["gpus_available"] == 0.0
    assert [r["job_id"] for r in snap["reservations"]] == [f"job-{n}" for n in range(4)]
    assert all(r["gpus"] == 0.5 and r["since"] and r["started"] is False for r in snap["reservations"])
    with pytest.raises(GpuUnavailable, match="asks for 0.25 GPU.*0 of 2 are free") as info:
        inv.reserve("job-4", 0.25, TWO_GPUS, TWO_GPUS)
    assert isinstance(info.value, Conflict) and info.value.code == "gpus_unavailable"
    assert info.value.details["gpus_available"] == 0.0


def test_over_reservation_is_refused_and_nothing_is_claimed():
    inv = GpuInventory(use_nvml=False)
    inv.reserve("a", 1, TWO_GPUS, TWO_GPUS)
    with pytest.raises(GpuUnavailable, match="asks for 2 GPU.*1 of 2 are free"):
        inv.reserve("b", 2, TWO_GPUS, TWO_GPUS)
    assert [r["job_id"] for r in inv.reservations()] == ["a"]


def test_reserving_again_for_the_same_job_returns_the_same_claim():
    inv = GpuInventory(use_nvml=False)
    first = inv.reserve("job", 0.25, TWO_GPUS, TWO_GPUS)
    assert inv.reserve("job", 0.25, TWO_GPUS, TWO_GPUS) == first
    assert inv.snapshot(TWO_GPUS, TWO_GPUS)["gpus_available"] == 1.75
    with pytest.raises(GpuUnavailable, match="already holds 0.25"):
        inv.reserve("job", 1, TWO_GPUS, TWO_GPUS)


def test_release_frees_the_claim_and_is_harmless_twice():
    inv = GpuInventory(use_nvml=False)
    inv.reserve("job", 2, TWO_GPUS, TWO_GPUS)
    assert inv.snapshot(TWO_GPUS, TWO_GPUS)["gpus_available"] == 0.0
    assert inv.release("job") is True
    assert inv.release("job") is False
    assert inv.snapshot(TWO_GPUS, TWO_GPUS)["gpus_available"] == 2.0
    inv.reserve("other", 2, TWO_GPUS, TWO_GPUS)


def test_a_started_job_is_counted_by_ray_not_twice():
    inv = GpuInventory(use_nvml=False)
    inv.reserve("running", 1, TWO_GPUS, TWO_GPUS)
    inv.reserve("pending", 0.5, TWO_GPUS, TWO_GPUS)
    assert inv.started("running") is True and inv.started("unknown") is False
    ray_now = {"GPU": 1.0}  # Ray's available GPUs once the running job holds its one
    snap = inv.snapshot(TWO_GPUS, ray_now)
    assert snap["gpus_available"] == 0.5  # 1 free in Ray, 0.5 claimed by the pending job
    assert {r["job_id"]: r["started"] for r in snap["reservations"]} == {"running": True, "pending": False}
    # Ray's availability lower than the claims (work outside the manager): never below zero
    assert inv.snapshot(TWO_GPUS, {"GPU": 0.25})["gpus_available"] == 0.0


@pytest.mark.parametrize("gpus, words", [(0, "must be > 0"), (-1, "must be > 0")])
def test_amounts_ray_would_refuse_are_refused(gpus, words):
    with pytest.raises(InvalidInput, match=words):
        GpuInventory(use_nvml=False).reserve("job", gpus, TWO_GPUS, TWO_GPUS)


def test_a_jobs_total_may_be_fractional_above_one():
    """Three workers with half a GPU each: 1.5 GPUs for the job, 0.5 per Ray request."""
    held = GpuInventory(use_nvml=False).reserve("job", 1.5, TWO_GPUS, TWO_GPUS)
    assert held["gpus"] == 1.5


def test_reservations_on_a_cluster_without_gpus_are_refused():
    with pytest.raises(GpuUnavailable, match="0 of 0 are free"):
        GpuInventory(use_nvml=False).reserve("job", 0.5, {"CPU": 2.0}, {"CPU": 2.0})


# -- request policy --------------------------------------------------------------------------
def test_refuse_policy_rejects_gpu_jobs_on_a_cluster_without_gpus():
    with pytest.raises(InvalidInput, match="asks for 1 GPU.*has none") as info:
        check_request(1, 0, "refuse")
    assert info.value.details == {"field": "resources", "gpus_needed": 1.0, "gpus_total": 0.0}
    with pytest.raises(InvalidInput, match="asks for 4 GPUs.*has 2"):
        check_request(4, 2, "refuse")
    check_request(0, 0, "refuse")  # CPU-only jobs are always fine
    check_request(0.5, 2, "refuse")


def test_queue_policy_accepts_gpu_jobs_for_an_autoscaling_cluster():
    check_request(1, 0, "queue")
    check_request(8, 2, "queue")


def test_unknown_policy_is_named():
    with pytest.raises(InvalidInput, match="unknown GPU policy 'later'"):
        check_request(1, 0, "later")


# -- GET /v1/gpus ----------------------------------------------------------------------------
class _FixedCluster:
    """A GPU source over fixed Ray resources, as the GPUManager actor is over live ones."""

    def __init__(self, inventory: GpuInventory, cluster: dict, available: dict):
        self.inventory, self.cluster, self.available = inventory, cluster, available

    async def snapshot(self) -> dict:
        return self.inventory.snapshot(self.cluster, self.available)


class _NoJobs:
    async def notify(self):
        raise AssertionError("not used")

    async def cancel(self, job_id, actor):
        raise AssertionError("not used")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from tests.support import in_process_context

    from app.api.app import create_app
    from app.api.gpus import router
    from app.bootstrap import prepare
    from app.settings import load_settings

    home = tmp_path_factory.mktemp("gpus_home")
    settings = load_settings("local", matih_home=str(home), mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, _NoJobs())
    inventory = GpuInventory(use_nvml=False)
    inventory.reserve("train-1", 0.5, TWO_GPUS, TWO_GPUS)
    ctx.gpus = _FixedCluster(inventory, TWO_GPUS, TWO_GPUS)  # the field the Gateway will set
    app = create_app(ctx)
    if not any(getattr(r, "path", "") == "/v1/gpus" for r in app.routes):  # until app.api.app lists the router
        app.include_router(router(ctx))
    viewer = ctx.store.create_token("gpu-viewer", "viewer", "test")[1]
    yield TestClient(app), viewer
    ctx.store.dispose()


def test_get_gpus_shows_totals_and_reservations_to_a_viewer(api):
    client, viewer = api
    r = client.get("/v1/gpus", headers={"Authorization": f"Bearer {viewer}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["gpus_total"] == 2.0 and body["gpus_available"] == 1.5
    assert body["devices"] == [] and body["nvml"] is False
    assert [(x["job_id"], x["gpus"], x["started"]) for x in body["reservations"]] == [("train-1", 0.5, False)]


def test_get_gpus_needs_a_token(api):
    client, _ = api
    r = client.get("/v1/gpus")
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
