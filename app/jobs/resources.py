"""What a job asks of the cluster, from its spec: the CPUs of its driver process (the Ray Job
entry point) and the CPUs and GPUs of everything it starts. The scheduler admits a job when
the cluster has this much free; the API refuses a job that could never fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import InvalidInput
from app.settings import Settings


@dataclass(frozen=True)
class JobNeeds:
    driver_cpus: float  # the entry point process itself
    cpus: float  # driver + workers (or one trial at a time for a search)
    gpus: float

    def as_dict(self) -> dict[str, float]:
        return {"CPU": self.cpus, "GPU": self.gpus}


def job_needs(kind: str, spec: dict[str, Any], settings: Settings) -> JobNeeds:
    if kind == "training":
        from app.training.spec import TrainingJobSpec

        t = TrainingJobSpec.model_validate(spec)
        if t.tune is not None:  # trials reserve their own CPUs; admit when one trial fits
            return JobNeeds(0.0, t.tune.cpus_per_trial, t.resources.gpus_per_worker)
        if t.framework == "sklearn":  # fitted in the driver process
            cpus = t.resources.cpus(settings.jobs.num_cpus)
            return JobNeeds(cpus, cpus, t.resources.gpus_per_worker)
        totals = t.resources.totals(settings.jobs.num_cpus)  # Ray Train workers; the driver only waits
        return JobNeeds(0.0, totals["CPU"], totals["GPU"])
    if kind == "batch_prediction":
        from app.batch.spec import BatchJobSpec

        b = BatchJobSpec.model_validate(spec)
        driver = b.resources.num_cpus or settings.batch.driver_num_cpus
        workers = (b.num_cpus_per_worker or settings.batch.worker_num_cpus) * 1  # one predictor is enough to start
        return JobNeeds(driver, driver + workers, b.num_gpus_per_worker + (b.resources.num_gpus or 0))
    if kind == "ensemble":
        from app.ensembles.spec import EnsembleSpec

        e = EnsembleSpec.model_validate(spec)
        if e.method == "bagging":  # members are Ray tasks that reserve their own CPUs; the driver waits.
            # Admitted when the tasks fit up to jobs.num_cpus (at least one task); more run as CPUs free up.
            per = e.resources.cpus_per_member
            return JobNeeds(0.0, max(per, min(e.n_estimators * per, settings.jobs.num_cpus)), 0.0)
        # stacking refits, blending and boosting fit, in the driver process
    if kind == "feature_materialize" and settings.features.engine == "ray":
        # The driver mostly waits: Feast's Ray compute engine runs Ray Data tasks (1 CPU each, as
        # Feast asks no other amount) in the room the scheduler admitted the job with; Ray Data's
        # resource limit (app.features.jobs) keeps them to jobs.num_cpus (at least one task's CPU).
        return JobNeeds(0.0, max(1.0, settings.jobs.num_cpus), 0.0)
    if kind == "monitor_run":
        # The driver reads the log with Ray Data and waits on the drift tasks
        # (monitoring.task_num_cpus each), which run in the room the job was admitted with.
        return JobNeeds(0.0, max(settings.monitoring.task_num_cpus, min(1.0, settings.jobs.num_cpus)), 0.0)
    return JobNeeds(settings.jobs.num_cpus, settings.jobs.num_cpus, 0.0)


def check_fits(needs: JobNeeds, cluster: dict[str, float], settings: Settings, field: str = "resources") -> None:
    """Refuse (422) a job that could never run on this cluster, unless the cluster autoscales
    (settings.jobs.unschedulable = 'queue')."""
    if settings.jobs.unschedulable == "queue":
        return
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    if needs.gpus > 0 and gpus == 0:
        raise InvalidInput(
            f"the job asks for {needs.gpus:g} GPU(s) and this cluster has none; set the GPUs per worker to 0 "
            "(set jobs.unschedulable to 'queue' on a cluster that adds GPU nodes on demand)",
            details={"field": field},
        )
    if needs.gpus > gpus:
        raise InvalidInput(
            f"the job asks for {needs.gpus:g} GPUs and the whole cluster has {gpus:g}", details={"field": field}
        )
    if cpus and needs.cpus > cpus:
        raise InvalidInput(
            f"the job asks for {needs.cpus:g} CPUs and the whole cluster has {cpus:g}; use fewer workers or "
            "fewer CPUs per worker", details={"field": field},
        )
