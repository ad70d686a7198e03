"""GPU inventory and reservations: what the cluster has, what is free, who holds what.

Two sources describe GPUs, and they answer different questions:

- Ray's resources (``ray.cluster_resources()`` / ``ray.available_resources()``, passed in as
  dicts) are the scheduling truth: ``GPU`` totals across every node, fractional, and what
  running tasks and actors hold. Totals and availability come from here.
- NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``) describes the devices of this
  node: name, memory, utilisation. It is optional: without the package or a driver the
  inventory lists no devices and says ``"nvml": false``; nothing else changes.

Reservations are claims made for jobs that are about to start (fractions allowed: 0.25 of
a GPU is four jobs on one device). A reservation that has not started yet is invisible to
Ray, so ``gpus_available`` is Ray's available GPUs minus those pending claims (never below
zero); once the job runs (:meth:`GpuInventory.started`) Ray counts it and the claim stops
being subtracted. ``reserve`` refuses with :class:`GpuUnavailable` (409) when the claim does
not fit, and is idempotent per job id, so a retried submission does not claim twice.

A request for GPUs on a cluster that has none (:func:`check_request`) is refused by default
(policy ``"refuse"``: 422 at submission, naming the request), because such a job would wait
forever in the queue. Policy ``"queue"`` is for clusters whose autoscaler adds GPU nodes on
demand (KubeRay with a GPU worker group at zero replicas): the job is accepted and waits for
Ray to grant the GPUs.

Plain Python: Ray is never imported here; the GPUManager actor (``actors/gpu_manager.py``)
reads Ray's resources and calls this core.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from app.errors import Conflict, InvalidInput

log = logging.getLogger(__name__)

GpuPolicy = Literal["refuse", "queue"]
GPU_POLICIES: tuple[str, ...] = ("refuse", "queue")
#: Ray accounts resources in units of 1e-4; GPU amounts are rounded to that grain.
_GRAIN = 4


class GpuUnavailable(Conflict):
    """Not enough free GPUs for a reservation right now (409); retry when jobs finish."""

    code = "gpus_unavailable"


@dataclass
class Reservation:
    job_id: str
    gpus: float
    since: str  # ISO 8601, UTC
    started: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "gpus": self.gpus, "since": self.since, "started": self.started}


def check_gpus(gpus: float) -> float:
    """A GPU amount Ray accepts: > 0, and a whole number when above 1 (as Ray requires)."""
    gpus = round(float(gpus), _GRAIN)
    if gpus <= 0:
        raise InvalidInput(f"gpus must be > 0 (got {gpus:g})", details={"field": "gpus"})
    if gpus > 1 and not gpus.is_integer():
        raise InvalidInput(
            f"gpus above 1 must be a whole number (got {gpus:g}); use a fraction of one GPU or whole GPUs",
            details={"field": "gpus"},
        )
    return gpus


def check_request(gpus_needed: float, cluster_total: float, policy: GpuPolicy = "refuse") -> None:
    """Whether a job asking for ``gpus_needed`` GPUs may be queued on a cluster with
    ``cluster_total`` GPUs. ``refuse`` raises :class:`InvalidInput` when the cluster could
    never run it (no GPUs, or fewer than asked); ``queue`` accepts it, for clusters that
    autoscale GPU nodes."""
    if policy not in GPU_POLICIES:
        raise InvalidInput(f"unknown GPU policy {policy!r}; use one of: {', '.join(GPU_POLICIES)}")
    needed = round(float(gpus_needed or 0), _GRAIN)
    total = round(float(cluster_total or 0), _GRAIN)
    if needed <= 0 or policy == "queue" or needed <= total:
        return
    if total == 0:
        raise InvalidInput(
            f"the job asks for {needed:g} GPU(s) and the Ray cluster has none; set the GPUs to 0 to run on "
            "CPUs, or add GPU nodes (a cluster that autoscales GPU nodes sets jobs.unschedulable to 'queue')",
            details={"field": "resources", "gpus_needed": needed, "gpus_total": total},
        )
    raise InvalidInput(
        f"the job asks for {needed:g} GPUs and the Ray cluster has {total:g}; ask for at most {total:g}",
        details={"field": "resources", "gpus_needed": needed, "gpus_total": total},
    )


def read_nvml_devices() -> list[dict[str, Any]] | None:
    """The devices NVML sees on this node, or None when NVML cannot be used here (no
    ``pynvml`` package, no driver). A field a device does not support is None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        return [_device(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing devices: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _device(pynvml, index: int) -> dict[str, Any]:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(fn, *args):
        try:
            value = fn(handle, *args)
        except pynvml.NVMLError:
            return None
        return value.decode() if isinstance(value, bytes) else value

    memory = read(pynvml.nvmlDeviceGetMemoryInfo)
    rates = read(pynvml.nvmlDeviceGetUtilizationRates)
    mib = 1024 * 1024
    return {
        "index": index,
        "name": read(pynvml.nvmlDeviceGetName),
        "uuid": read(pynvml.nvmlDeviceGetUUID),
        "memory_total_mib": memory.total // mib if memory is not None else None,
        "memory_used_mib": memory.used // mib if memory is not None else None,
        "utilization_pct": rates.gpu if rates is not None else None,
    }


class GpuInventory:
    """The GPU core of the GPUManager: reservations in memory, devices from NVML.

    Thread-safe. ``use_nvml=False`` never touches NVML (tests, or nodes where the driver
    must not be loaded)."""

    def __init__(self, use_nvml: bool = True):
        self.use_nvml = use_nvml
        self._reservations: dict[str, Reservation] = {}
        self._lock = threading.Lock()

    # -- devices ---------------------------------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        """This node's devices (name, index, uuid, memory total/used in MiB, utilisation %),
        or [] without NVML."""
        return (read_nvml_devices() or []) if self.use_nvml else []

    # -- reservations ----------------------------------------------------------------------
    def reserve(self, job_id: str, gpus: float, cluster_resources: dict[str, float],
                available_resources: dict[str, float]) -> dict[str, Any]:
        """Claim ``gpus`` for ``job_id``; returns the reservation. The same job reserving the
        same amount again gets its reservation back; a different amount is a conflict."""
        gpus = round(float(gpus), _GRAIN)  # a job's total over its workers: 3 x 0.5 = 1.5 is fine
        if gpus <= 0:
            raise InvalidInput(f"gpus must be > 0 (got {gpus:g})", details={"field": "gpus"})
        with self._lock:
            held = self._reservations.get(job_id)
            if held is not None:
                if held.gpus != gpus:
                    raise GpuUnavailable(
                        f"job {job_id} already holds {held.gpus:g} GPU(s); release it before reserving {gpus:g}",
                        details={"job_id": job_id, "gpus": held.gpus},
                    )
                return held.as_dict()
            total = _gpus(cluster_resources)
            free = self._free(available_resources)
            if gpus > free:
                raise GpuUnavailable(
                    f"job {job_id} asks for {gpus:g} GPU(s) and {free:g} of {total:g} are free; it can start "
                    "when running jobs release theirs",
                    details={"job_id": job_id, "gpus": gpus, "gpus_available": free, "gpus_total": total},
                )
            held = Reservation(job_id, gpus, datetime.now(timezone.utc).isoformat())
            self._reservations[job_id] = held
            return held.as_dict()

    def started(self, job_id: str) -> bool:
        """The job's Ray task or actor now holds its GPUs, so Ray's available count includes
        the claim. Returns whether the job had a reservation."""
        with self._lock:
            held = self._reservations.get(job_id)
            if held is not None:
                held.started = True
            return held is not None

    def release(self, job_id: str) -> bool:
        """Drop the job's reservation (it finished, failed or was cancelled). Returns whether
        there was one; releasing twice is harmless."""
        with self._lock:
            return self._reservations.pop(job_id, None) is not None

    def reservations(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.as_dict() for r in sorted(self._reservations.values(), key=lambda r: r.since)]

    # -- the view --------------------------------------------------------------------------
    def snapshot(self, cluster_resources: dict[str, float], available_resources: dict[str, float]) -> dict[str, Any]:
        """What ``GET /v1/gpus`` shows: {"gpus_total", "gpus_available", "devices",
        "reservations", "nvml"}."""
        devices = read_nvml_devices() if self.use_nvml else None
        with self._lock:
            free = self._free(available_resources)
            held = [r.as_dict() for r in sorted(self._reservations.values(), key=lambda r: r.since)]
        return {
            "gpus_total": _gpus(cluster_resources),
            "gpus_available": free,
            "devices": devices or [],
            "reservations": held,
            "nvml": devices is not None,
        }

    def _free(self, available_resources: dict[str, float]) -> float:
        pending = sum(r.gpus for r in self._reservations.values() if not r.started)
        return max(0.0, round(_gpus(available_resources) - pending, _GRAIN))


def _gpus(resources: dict[str, float] | None) -> float:
    return round(float((resources or {}).get("GPU", 0.0)), _GRAIN)
