"""The application builder that ``serve run`` / ``serve deploy`` call (see serve_config.yaml).

``build(args)`` loads and checks the settings (a bad profile stops here, before anything
deploys), does the one-time start-up work, makes sure the singleton actors exist, and
returns the Gateway bound to its ModelServer (and the GPU pool where GPUs exist) and to the
Ensemble deployment, which fans ensembles out to the ModelServer replicas.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray.serve import Application


class Args(BaseModel):
    """Arguments of the application, from ``applications[].args`` in serve_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = Field(
        None, description="Profile in configs/ (local, production); default: $MATIH_PROFILE or local."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Setting overrides (field names of app.settings.Settings)."
    )


def build(args: dict[str, Any] | Args | None = None) -> Application:
    from actors.drift_monitor import get_drift_monitor
    from actors.event_relay import get_event_relay
    from actors.gpu_manager import get_gpu_manager
    from actors.job_scheduler import get_job_scheduler
    from actors.prediction_log import get_prediction_log
    from actors.registry_cache import get_registry_cache
    from actors.rollout_controller import get_rollout_controller
    from actors.stream_ingestor import get_stream_ingestor
    from app.bootstrap import prepare
    from app.serving.ingress import LOG_TO_STDERR
    from app.settings import load_settings
    from deployments.gateway import Gateway
    from deployments.ensemble import Ensemble
    from deployments.model_server import ModelServer

    parsed = args if isinstance(args, Args) else Args.model_validate(args or {})
    settings = load_settings(parsed.profile, **parsed.settings)
    prepared = prepare(settings)
    if prepared.admin_token is not None:  # the local profile's generated token: the Gateway gets it too
        settings = settings.model_copy(update={"admin_token": SecretStr(prepared.admin_token)})
    # Every process gets the settings without credentials, and in its environment only the
    # credentials it needs (Settings.credential_env); a job gets its own from the JobScheduler.
    kwargs = settings.shared_kwargs()
    get_job_scheduler(kwargs, settings.actors.num_cpus, settings.credential_env("job_scheduler"))
    get_registry_cache(kwargs, settings.actors.num_cpus, settings.credential_env("registry_cache"))
    get_gpu_manager(settings.actors.num_cpus)
    get_event_relay(kwargs, settings.actors.num_cpus, settings.credential_env("event_relay"))
    get_prediction_log(kwargs, settings)
    get_rollout_controller(kwargs, settings.actors.num_cpus, settings.credential_env("rollout_controller"))
    # the Feast registry (database URL), the Redis online store and Redis Streams
    get_stream_ingestor(kwargs, settings.features.ingestor_num_cpus, settings.credential_env("stream_ingestor"))
    # monitor schedules, the retraining loop, alert webhooks and gauges
    get_drift_monitor(kwargs, settings.monitoring.monitor_num_cpus, settings.credential_env("drift_monitor"))
    _announce_ray_auth()

    # The replicas' Serve logs (access lines included) stay in their files unless
    # serving.log_to_terminal: also under a plain `serve run`, whose cluster did not start with
    # the cluster environment of app/serving/ingress.py.
    serve_env = {LOG_TO_STDERR: "1" if settings.serving.log_to_terminal else "0", **settings.serving.serve_env}
    env = {"env_vars": {**serve_env, **settings.credential_env("model_server")}}
    gateway_env = {"env_vars": {**serve_env, **settings.credential_env("gateway")}}
    scaling = settings.serving.autoscaling
    replicas = (
        {"autoscaling_config": scaling.model_dump()}
        if scaling is not None
        else {"num_replicas": settings.serving.model_server_replicas}
    )
    model_server = ModelServer.options(
        ray_actor_options={"num_cpus": settings.serving.model_server_num_cpus, "runtime_env": env},
        logging_config={"enable_access_log": settings.serving.model_server_access_log},
        max_queued_requests=settings.serving.model_server_max_queued_requests,
        **replicas,
    ).bind(kwargs)
    gpu_pool = None
    if _cluster_gpus() > 0:  # a GPU pool only where GPUs exist; CPU-only clusters never ask for one
        gpu_pool = ModelServer.options(
            name="ModelServerGPU",
            num_replicas=settings.serving.gpu_replicas,
            max_queued_requests=settings.serving.model_server_max_queued_requests,
            ray_actor_options={"num_cpus": settings.serving.model_server_num_cpus,
                               "num_gpus": settings.serving.gpu_num_gpus, "runtime_env": env},
        ).bind(kwargs)
    ensemble_scaling = settings.serving.ensemble_autoscaling
    ensemble = Ensemble.options(
        ray_actor_options={"num_cpus": settings.serving.ensemble_num_cpus, "runtime_env": env},
        max_ongoing_requests=settings.serving.ensemble_max_ongoing_requests,
        logging_config={"enable_access_log": settings.serving.model_server_access_log},
        **(
            {"autoscaling_config": ensemble_scaling.model_dump()}
            if ensemble_scaling is not None
            else {"num_replicas": settings.serving.ensemble_replicas}
        ),
    ).bind(kwargs, model_server, gpu_pool)
    from ray.serve.config import BackpressureConfig

    return Gateway.options(
        num_replicas=settings.http.gateway_replicas,
        # Past the queue the proxy itself answers 503 with Retry-After (its body is Serve's text).
        max_queued_requests=settings.http.gateway_max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        ray_actor_options={"num_cpus": settings.http.gateway_num_cpus, "runtime_env": gateway_env},
    ).bind(kwargs, model_server, gpu_pool, ensemble)


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _announce_ray_auth() -> None:
    """Say how a Ray client reaches this cluster. A cluster that ``serve run`` starts has Ray's
    token authentication on (Ray's default for a new local cluster), and a client such as
    ``ray job submit`` sends the token only when its own environment says RAY_AUTH_MODE=token."""
    import os

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        print(
            "matih-ml: Ray token authentication is on for this cluster: run Ray clients (`ray job submit`, "
            "the dashboard's API) with RAY_AUTH_MODE=token; they read the token from RAY_AUTH_TOKEN or "
            "~/.ray/auth_token (on this machine: `ray get-auth-token`). See docs/training.md.",
            flush=True,
        )
