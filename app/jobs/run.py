"""The entry point of every job: ``python -m app.jobs.run``.

The JobScheduler starts each job as a Ray Job running ``python -m app.jobs.run --job-id ID``.
The same code runs a spec by hand on any Ray cluster::

    ray job submit --working-dir . -- python -m app.jobs.run --spec spec.yaml
    ray job submit --working-dir . -- python -m app.jobs.run --spec ens.yaml --kind ensemble

With ``--spec`` the job is recorded in the metadata store as running (so the platform's API
shows it and no scheduler starts it again) and then runs exactly as a scheduled one. Settings
come from the platform's JobScheduler when it runs on this cluster, without credentials, else
from the profile. Credentials (``DATABASE_URL``, ``MLFLOW_TRACKING_URI``, ``S3_ACCESS_KEY``,
``S3_SECRET_KEY``) always come from this process's environment: the scheduler sets them in the
runtime_env of each job it submits; by hand, the cluster's or ``--runtime-env-json``'s.

Exit status: 0 succeeded, 1 failed, 2 a bad spec or arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("app.jobs.run")
KINDS = ("training", "batch_prediction", "ensemble", "feature_materialize", "feature_historical")


def _submission_id() -> str | None:
    """The Ray Job submission id this process runs as, when it is a Ray Job's entry point."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id")
    except ValueError:
        return None


def _connect(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        # The scheduler names its cluster's GCS address: with several Ray clusters on one machine,
        # the RAY_ADDRESS a Ray Job sets can point at another one. By hand, RAY_ADDRESS (or a new
        # local cluster) is used.
        ray.init(address=address, log_to_driver=True, namespace="matih-jobs")


def _settings(profile: str | None, required: bool):
    """The platform's settings when its JobScheduler runs on this cluster (without credentials:
    those come from this job's environment), else (only for a spec run by hand) the profile's."""
    import ray

    from actors.job_scheduler import find_job_scheduler
    from app.settings import Settings, load_settings

    scheduler = find_job_scheduler()
    if scheduler is not None:
        return Settings.from_shared(ray.get(scheduler.settings.remote(), timeout=120))
    if required:
        raise SystemExit(
            "no JobScheduler (namespace 'matih') on the Ray cluster this job runs on; "
            f"a --job-id job needs the platform's settings (cluster: {ray.get_runtime_context().gcs_address})"
        )
    log.info("no JobScheduler on this cluster; settings from the profile %s", profile or "(MATIH_PROFILE or local)")
    return load_settings(profile, need_admin_token=False)


def _load_spec(path: str, kind: str) -> dict[str, Any]:
    import yaml
    from pydantic import ValidationError

    from app.errors import MatihError

    text = Path(path).read_text()
    data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: a job spec is a mapping, not {type(data).__name__}")
    if kind == "training":
        from app.training.spec import TrainingJobSpec as Model
    elif kind == "ensemble":
        from app.ensembles.spec import EnsembleSpec as Model
    elif kind == "feature_materialize":
        from app.features.jobs import MaterializeSpec as Model
    elif kind == "feature_historical":
        from app.features.jobs import HistoricalSpec as Model
    else:
        from app.batch.spec import BatchJobSpec as Model
    try:
        return Model.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        lines = [f"{path}: the {kind} spec is not valid:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(spec)"
            lines.append(f"  {loc}: {err['msg']}")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
    except MatihError as exc:  # a spec's own checks raise the platform's errors (app.features.jobs)
        print(f"{path}: the {kind} spec is not valid: {exc.message}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.jobs.run", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--job-id", help="run this job of the metadata store (what the scheduler starts)")
    which.add_argument("--spec", help="a YAML or JSON job spec file to run now")
    parser.add_argument("--kind", choices=KINDS, default="training", help="kind of the --spec job (default training)")
    parser.add_argument("--profile", default=None, help="profile when no platform runs on the cluster")
    parser.add_argument("--ray-address", default=None, help="the cluster's GCS address (default: RAY_ADDRESS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    spec = _load_spec(args.spec, args.kind) if args.spec else None
    _connect(args.ray_address)
    settings = _settings(args.profile, required=spec is None)

    from app.jobs.runner import run_job
    from app.store import MetadataStore

    store = MetadataStore.from_settings(settings)
    if spec is not None:
        store.migrate()
        sub_id = _submission_id()
        job = store.create_job(
            args.kind, spec.get("name") or f"{args.kind}-by-hand", spec,
            f"ray-job:{sub_id}" if sub_id else "cli", priority=int(spec.get("priority") or 0),
            job_id=f"rayjob-{sub_id}" if sub_id else None,
            running_as=sub_id or f"local:{socket.gethostname()}:{os.getpid()}",
        )
        print(f"job {job['job_id']}: GET /v1/jobs/{job['job_id']} shows it", flush=True)
        job_id = job["job_id"]
    else:
        job_id = args.job_id
        job = store.get_job(job_id)
        if job["status"] != "running":  # cancelled while its Ray Job started, or a stale duplicate
            print(f"job {job_id} is {job['status']}, not running; nothing to do", flush=True)
            return 0
    final = run_job(job_id, settings, store)
    print(json.dumps({"job_id": job_id, "status": final["status"], "error": final.get("error"),
                      "result": final.get("result")}, default=str), flush=True)
    return 0 if final["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
