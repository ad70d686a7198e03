"""Typed configuration for the whole platform.

One settings model, read in this order (later wins):

1. the defaults declared below;
2. a profile YAML from ``configs/`` (``local`` by default, chosen with ``MATIH_PROFILE``);
3. the environment, under the names MATIH operators already use (``DATABASE_URL``,
   ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS``, ...);
4. keyword arguments given to :func:`load_settings` (tests, the application builder).

Unknown keys and bad values raise :class:`app.errors.ConfigError`, whose message names the
key and how to fix it, so a typo in a profile stops the start instead of being ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PROFILES = ("local", "production")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuthSettings(_Section):
    enabled: bool = Field(True, description="Require a bearer token on every route except /health.")
    admin_token_file: str = Field(
        "admin_token",
        description="File under MATIH_HOME holding the generated admin token (local profile only); "
        "created with mode 0600 on first start when MATIH_ADMIN_TOKEN is not set.",
    )
    generate_admin_token: bool = Field(
        True,
        description="Create an admin token on first start when none is configured. The production "
        "profile sets this to false, so it refuses to start without MATIH_ADMIN_TOKEN.",
    )
    cache_ttl_s: float = Field(
        5.0, ge=0, description="How long a gateway replica trusts a token lookup (a revoked token may work "
        "that long; an expired one never does)."
    )
    cache_size: int = Field(
        10_000, ge=1, description="Valid tokens a gateway replica caches (least recently used go first). Unknown "
        "tokens are cached apart, in a tenth of that, so a flood of random tokens never evicts a valid one.",
    )


class IngressSettings(_Section):
    """How HTTP (and gRPC) requests reach the Gateway replicas: one of Ray Serve's ingress modes,
    chosen for the whole Ray cluster by the environment its processes start with (see
    app/serving/ingress.py and "Choosing the ingress" in docs/configuration.md)."""

    mode: Literal["haproxy", "proxy"] = Field(
        "haproxy",
        description="haproxy: Ray Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1): HAProxy listens on http_port "
        "(and grpc_port) and forwards each request straight to a Gateway replica's own port, health-checked, "
        "least-connections across replicas; Serve's Python proxy stays only as HAProxy's backup. proxy: the "
        "classic Serve HTTP proxy actor on http_port, which relays every request to the Gateway (one Python hop "
        "more, several times the CPU per request: docs/benchmarks.md).",
    )
    haproxy_threads: int = Field(
        1, ge=1, le=64, description="HAProxy threads (RAY_SERVE_HAPROXY_NBTHREAD; Ray's default is 4). One "
        "thread forwards tens of thousands of requests a second, far more than the Gateway replicas behind it.",
    )
    stats_port: int = Field(
        8404, ge=1, le=65535, description="HAProxy's stats page (RAY_SERVE_HAPROXY_STATS_PORT). HAProxy binds it "
        "on every interface: keep it behind the node's firewall.",
    )
    metrics_port: int = Field(
        9101, ge=1, le=65535, description="HAProxy's Prometheus exporter (RAY_SERVE_HAPROXY_METRICS_PORT), bound "
        "on every interface like the stats page.",
    )
    fallback_http_port: int = Field(
        8500, ge=1, le=65535, description="The backup Serve proxy HAProxy falls back to while no Gateway replica "
        "is up (RAY_SERVE_FALLBACK_PROXY_HTTP_PORT).",
    )
    fallback_grpc_port: int = Field(
        9500, ge=1, le=65535, description="The backup Serve proxy's gRPC port (RAY_SERVE_FALLBACK_PROXY_GRPC_PORT)."
    )


class HttpSettings(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Interface the HTTP API listens on (HAProxy or the Serve proxy, and the Gateway replicas), as `matih-ml up` starts it (http_options.host of "
        "serve_config.yaml): 127.0.0.1 = this machine only (local profile); 0.0.0.0 = every interface "
        "(production profile: put TLS in front of it).",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="Largest request body accepted; larger ones get 413."
    )
    gateway_replicas: int = Field(1, ge=1, description="Gateway replicas (each one a FastAPI app).")
    gateway_num_cpus: float = Field(0.1, gt=0, description="CPUs reserved per gateway replica.")
    request_timeout_s: float = Field(
        60.0, gt=1, description="End-to-end limit of one HTTP request. Set Serve's http_options.request_timeout_s "
        "(serve_config.yaml) to the same value: the Gateway answers 504 with an error body just before it "
        "(Serve's own answer would be a bare 408). A client may ask for less with the x-request-timeout-seconds "
        "header, never for more.",
    )
    ingress: IngressSettings = Field(
        default_factory=IngressSettings, description="Ray Serve's ingress mode and its ports."
    )
    gateway_max_queued_requests: int = Field(
        512, ge=1, description="Requests the Serve proxy queues for the Gateway when every replica has "
        "max_ongoing_requests in flight; more get 503 with Retry-After (Serve's max_queued_requests)."
    )


class AutoscalingSettings(_Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica Serve aims for.")


class IdleSettings(_Section):
    """How often the cluster's own background loops run while no request arrives (issue 11:
    the idle cost). Ray's defaults suit a busy cluster; these suit a laptop, and each one costs
    only how soon something is noticed, never a request's latency. They are cluster-wide
    variables (app/serving/ingress.py puts them in the environment the cluster starts with;
    ``matih-ml ray-env`` prints them), so they take effect when the cluster starts, not on redeploy."""

    control_loop_interval_s: float = Field(
        0.5, gt=0, le=10, description="Period of the Serve controller's control loop "
        "(RAY_SERVE_CONTROL_LOOP_INTERVAL_S; Ray's default 0.1): how soon it acts on a dead replica, a "
        "deploy or an autoscaling decision. The controller spent most of the idle CPU at 0.1 s.",
    )
    serve_metrics_export_interval_ms: int = Field(
        1000, ge=0, description="How often each Serve replica and handle router hands its cached request "
        "metrics to Ray's metrics API (RAY_SERVE_METRICS_EXPORT_INTERVAL_MS; Ray's default 100, so every replica, "
        "the Gateway's router and the proxy woke 10 times a second). Ray exports them every "
        "metrics_report_interval_ms anyway; 0 records each request at once (no cache).",
    )
    memory_monitor_refresh_ms: int = Field(
        1000, ge=0, description="How often the raylet reads every worker's memory for its OOM killer "
        "(RAY_memory_monitor_refresh_ms; Ray's default 250; 0 turns the OOM killer off).",
    )
    task_events_report_interval_ms: int = Field(
        5000, ge=100, description="How often each Ray worker sends its task events to the GCS "
        "(RAY_task_events_report_interval_ms; Ray's default 1000): how stale `ray list tasks` and the "
        "dashboard's task view may be.",
    )
    metrics_report_interval_ms: int = Field(
        10000, ge=1000, description="How often each Ray process exports its metrics to the node's metrics "
        "agent (RAY_metrics_report_interval_ms, Ray's default 10000); keep at or under the Prometheus scrape "
        "interval.",
    )
    node_stats_interval_ms: int = Field(
        15000, ge=1000, description="How often the dashboard agent of each node reads the CPU and memory of the "
        "node and of every Ray process (REPORTER_UPDATE_INTERVAL_MS; Ray's default 5000): the period of the "
        "dashboard's node view and of the node metrics.",
    )
    extra_env: dict[str, str] = Field(
        default_factory=dict, description="More cluster-wide variables, e.g. {\"RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S\": "
        "\"30\"}; they win over the fields above.",
    )

    def cluster_env(self) -> dict[str, str]:
        """The variables these settings stand for."""
        return {
            "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": f"{self.control_loop_interval_s:g}",
            "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": str(self.serve_metrics_export_interval_ms),
            "RAY_memory_monitor_refresh_ms": str(self.memory_monitor_refresh_ms),
            "RAY_task_events_report_interval_ms": str(self.task_events_report_interval_ms),
            "RAY_metrics_report_interval_ms": str(self.metrics_report_interval_ms),
            "REPORTER_UPDATE_INTERVAL_MS": str(self.node_stats_interval_ms),
            **self.extra_env,
        }


class ServingSettings(_Section):
    max_models_per_replica: int = Field(
        8, ge=1, description="Models a ModelServer replica keeps loaded (least recently used go first)."
    )
    model_server_replicas: int = Field(1, ge=1, description="ModelServer replicas when autoscaling is off.")
    autoscaling: AutoscalingSettings | None = Field(
        None, description="ModelServer autoscaling (Serve autoscaling_config); null = fixed replicas."
    )
    model_server_num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per ModelServer replica.")
    model_server_access_log: bool = Field(
        False, description="Write a Serve access-log line per ModelServer call too (the Gateway logs every "
        "request already)."
    )
    inline_onnx: bool = Field(
        True, description="Gateway replicas run ONNX models on CPU in their own process (with the ModelServer's "
        "code: LRU of serving.max_models_per_replica models, batching, thread pools) instead of calling a "
        "ModelServer replica: a Serve handle call costs more CPU than the whole prediction. An endpoint chooses "
        "otherwise with config.placement; other runtimes and GPU endpoints always use the ModelServer pools.",
    )
    handle_grpc: bool = Field(
        True, description="Gateway -> ModelServer calls over Serve's direct gRPC channel rather than a Ray actor "
        "task per call (faster for small payloads)."
    )
    serve_env: dict[str, str] = Field(
        default_factory=lambda: {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "100",
        },
        description="Environment of the Gateway and ModelServer replicas. The defaults keep user code and the "
        "handle router on the replica's own event loop, which takes two thread hops off every request "
        "(our request paths never block that loop: blocking work goes to threads), and buffer request logs "
        "instead of flushing a file write per request.",
    )
    log_to_terminal: bool = Field(
        False, description="Serve's logs (an access line per request, and what the Gateway and ModelServer "
        "replicas log or print) on the terminal of `serve run` / `matih-ml up` as well as in the log files "
        "(RAY_SERVE_LOG_TO_STDERR: in the cluster environment, and in the replicas' own so that a plain "
        "`serve run` obeys it too). Off: only in the files under /tmp/ray/session_latest/logs/serve/; the "
        "control actors' warnings still reach the terminal.",
    )
    idle: IdleSettings = Field(
        default_factory=IdleSettings, description="Periods of the cluster's background loops (the idle cost)."
    )
    gpu_num_gpus: float = Field(
        0.5, gt=0, le=8, description="GPUs per replica of the GPU pool (ModelServerGPU), which is deployed only "
        "when the Ray cluster has GPUs; endpoints opt in with config {\"device\": \"gpu\"}."
    )
    gpu_replicas: int = Field(1, ge=1, description="Replicas of the GPU pool where it exists.")
    onnx_intra_op_threads: int = Field(
        1, ge=0, description="ONNX Runtime intra-op threads per session (0 = ONNX Runtime decides)."
    )
    onnx_inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads per session.")
    mlflow_timeout_s: int = Field(
        5, ge=1, description="MLflow request timeout on the serving path (gateway, registry cache), which "
        "never retries: while MLflow is down it serves the last known good resolution instead."
    )
    shadow_max_in_flight: int = Field(
        8, ge=1, description="Calls of one shadow of an endpoint's traffic plan (copies of requests) that one Gateway "
        "replica runs at once, off the request path; a copy beyond it is dropped and counted "
        "(matih_shadow_requests_total{outcome=\"dropped\"}), so a slow shadow can pile up neither work nor "
        "starve the endpoint's other shadows."
    )
    bandit_refresh_s: float = Field(
        1.0, gt=0, description="How often a Gateway replica re-weighs a bandit traffic plan from the rewards in the "
        "metadata store (read in the background; requests use the weights it has)."
    )
    resolve_ttl_s: float = Field(
        2.0, ge=0, description="How long a gateway replica trusts an endpoint row and an alias resolution."
    )
    max_batch_rows: int = Field(10_000, gt=0, description="Most rows accepted in one predict request.")
    batching: bool = Field(True, description="Stack concurrent small requests for one model into one call.")
    batch_max_requests: int = Field(32, ge=1, description="Most requests in one batched model call.")
    batch_wait_s: float = Field(
        0.002, ge=0, description="How long a request may wait for others to batch with (seconds)."
    )
    batch_max_rows: int = Field(
        256, ge=1, description="Requests with more rows than this run on their own, unbatched."
    )
    object_store_models: int = Field(
        32, ge=1, description="Model artifacts the RegistryCache keeps in Ray's object store (LRU)."
    )
    model_server_max_queued_requests: int = Field(
        128, ge=1, description="Predict calls a Gateway replica queues for the ModelServer when every replica has "
        "max_ongoing_requests in flight; more get 429 with Retry-After (Serve's max_queued_requests)."
    )
    predict_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait of the Gateway for the ModelServer's answer to one predict call, "
        "a model load included; over it: 504."
    )
    replica_retries: int = Field(
        2, ge=0, description="Times the Gateway sends a predict call again when its ModelServer replica died or "
        "is unreachable (predictions have no side effects), within predict_timeout_s."
    )
    actor_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for a control actor's answer on the request path (RegistryCache "
        "resolution, JobScheduler, GPUManager); over it: 503 with Retry-After. A backstop for an actor that is "
        "stuck or restarting: MLflow being down is answered sooner (mlflow_timeout_s)."
    )
    model_fetch_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait of a ModelServer replica for a model's packed artifact from the "
        "RegistryCache (which downloads it from MLflow once); over it the load fails with 503."
    )
    model_io_threads: int = Field(
        2, ge=1, description="Threads per ModelServer replica that load models and call remote runtimes (triton)."
    )
    model_call_threads: int = Field(
        2, ge=1, description="Threads per ModelServer replica for model calls that must not hold its event loop: "
        "slow models (the call queue) and requests over batch_max_rows."
    )
    ensemble_num_cpus: float = Field(
        0.1, gt=0, description="CPUs reserved per Ensemble replica (the fan-out of ensembles placed on the model "
        "servers): it waits on its members' ModelServer calls and combines their answers, little CPU of its own."
    )
    ensemble_replicas: int = Field(1, ge=1, description="Ensemble replicas when ensemble_autoscaling is off.")
    ensemble_autoscaling: AutoscalingSettings | None = Field(
        None, description="Ensemble autoscaling (Serve autoscaling_config), apart from the ModelServer's; null = "
        "fixed replicas."
    )
    ensemble_max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one Ensemble replica takes at once (Serve's max_ongoing_requests); each "
        "holds one call per member on the ModelServer replicas."
    )


class JobSettings(_Section):
    max_concurrent: int = Field(1, ge=1, description="Jobs the scheduler runs at the same time.")
    num_cpus: float = Field(
        1.0, gt=0, description="CPUs a job asks Ray for when its spec names none (split across its workers)."
    )
    poll_interval_s: float = Field(
        0.5, gt=0, description="How often the scheduler looks at its queue and its running jobs while it has any."
    )
    idle_poll_interval_s: float = Field(
        5.0, gt=0, description="How often it looks while no job is running or held back: a submission through "
        "the API wakes it at once, so this only delays a job queued behind its back (by hand in the store, or "
        "by another scheduler). Never shorter than poll_interval_s.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Times a job is started again when its scheduler restarted before its Ray Job "
        "began, before it fails. A Ray Job that dies without recording an end fails its job at once."
    )
    ray_api_timeout_s: float = Field(
        10.0, gt=0, description="Timeout of each call to Ray's job API (submit, status, stop) from the scheduler."
    )
    ray_api_attempts: int = Field(
        3, ge=1, description="Tries of a Ray job API call that timed out or could not connect (backoff between); "
        "a submission that raised is then looked up by its id, and attached to when Ray has it."
    )
    reconcile_interval_s: float = Field(
        10.0, gt=0, description="How often the scheduler looks for jobs recorded running that it holds no handle "
        "for (a launch whose outcome Ray could not tell, a job started by hand): attached when their Ray Job "
        "exists, else queued again (or failed after max_attempts)."
    )
    finish_retry_s: float = Field(
        120.0, ge=0, description="How long a job keeps trying to record its end while the metadata store is "
        "unreachable, before its process ends (and the scheduler fails it)."
    )
    storage_path: str = Field(
        "",
        description="Where Ray Train and Ray Tune keep results and checkpoints: a local path or an s3:// URI; "
        "empty: MATIH_HOME/train_results. On a multi-node cluster, use shared storage (S3 or NFS).",
    )
    unschedulable: Literal["refuse", "queue"] = Field(
        "refuse",
        description="A job asking for more CPUs or GPUs than the whole cluster has: 'refuse' answers 422 at "
        "submission; 'queue' keeps it queued, for clusters that autoscale (e.g. add GPU nodes on demand).",
    )
    admission_grace_s: float = Field(
        10.0, ge=0,
        description="How long the scheduler counts a just-started job's resources as taken even though Ray "
        "does not show them used yet (its workers are starting).",
    )
    ray_job_runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="runtime_env of the Ray Job of each job, e.g. env_vars for the job processes. The entry "
        "point is the scheduler's own Python, so the platform must be installed on the cluster's nodes.",
    )
    allowed_estimators: list[str] = Field(
        default_factory=lambda: [
            "sklearn.linear_model.LogisticRegression",
            "sklearn.linear_model.LinearRegression",
            "sklearn.linear_model.Ridge",
            "sklearn.ensemble.RandomForestClassifier",
            "sklearn.ensemble.RandomForestRegressor",
            "sklearn.ensemble.GradientBoostingClassifier",
            "sklearn.ensemble.GradientBoostingRegressor",
            "sklearn.tree.DecisionTreeClassifier",
            "sklearn.tree.DecisionTreeRegressor",
            "sklearn.neighbors.KNeighborsClassifier",
            "sklearn.svm.SVC",
        ],
        description="Import paths a training job may name as its estimator.",
    )
    onnx_parity_tolerance: float = Field(
        1e-4,
        ge=0,
        description="Largest |ONNX - native| difference on held-out rows before a job fails: absolute for "
        "class probabilities, relative to the largest |prediction| (at least 1) for regressors.",
    )


class ActorSettings(_Section):
    num_cpus: float = Field(0.05, ge=0, description="CPUs each detached control actor reserves.")


class RegistrySettings(_Section):
    """Registry rules (``/v1/models``): what a version needs before it may reach production,
    and which extra types a skops file may hold."""

    production_requires_validation: bool = Field(
        True,
        description="A version moves to production only with the tag matih.validation=passed (set by a "
        "training job's ONNX parity check or by the conversion check at registration).",
    )
    production_requires_approval: bool = Field(
        True,
        description="A version moves to production only after an admin's POST .../approve (recorded in the "
        "metadata store with the sha256 of the version's model file; the tag matih.approved_by mirrors it).",
    )
    convert_num_cpus: float = Field(
        0.25,
        ge=0,
        description="CPUs reserved by the Ray task that checks and converts a model file at registration "
        "(an upload, a source file, POST .../convert): that work runs in its own worker process, not in the "
        "Gateway. The registration waits until Ray has them free; 0 never waits, at the price of CPU accounting.",
    )
    convert_timeout_s: float = Field(
        50.0, gt=0, description="Longest wait of the Gateway for the Ray task that checks and converts a model file; "
        "over it: 503 with Retry-After (the task may still finish: list the versions before retrying). Keep it "
        "under http.request_timeout_s.",
    )
    outbox_recover_after_s: float = Field(
        120.0,
        ge=0,
        description="When the RegistryCache actor starts, registry mutations (version creation, stage change, "
        "model deletion) left pending at least this long ago by a process that died midway are finished or "
        "rolled back from what MLflow holds; younger ones may still be in flight in a live Gateway.",
    )
    skops_trusted_types: list[str] = Field(
        default_factory=lambda: [
            "sklearn.tree._tree.Tree",
            "sklearn.neighbors._kd_tree.KDTree",
            "sklearn.neighbors._ball_tree.BallTree",
            "sklearn.metrics._dist_metrics.EuclideanDistance64",
            "sklearn.metrics._dist_metrics.ManhattanDistance64",
            "sklearn.metrics._dist_metrics.MinkowskiDistance64",
        ],
        description="Types a skops file may hold beyond those skops trusts itself; any other type refuses "
        "the registration with 422 naming it.",
    )


class BatchSettings(_Section):
    """Batch prediction jobs (``POST /v1/batch/jobs``): Ray Data defaults a request may override."""

    batch_size: int = Field(8192, gt=0, description="Rows per ONNX Runtime call in a predictor (which gets whole blocks).")
    concurrency: int = Field(
        2, ge=1, description="Most predictor actors in the pool (one ONNX Runtime session each); a job with little "
        "model work gets fewer, a request that names concurrency exactly that.",
    )
    worker_num_cpus: float = Field(0.5, gt=0, description="CPUs each predictor actor reserves.")
    io_num_cpus: float = Field(0.2, gt=0, description="CPUs each CSV read task reserves (parquet is read in the predictors).")
    driver_num_cpus: float = Field(
        0.1, gt=0, description="CPUs of the job's own task, which plans the Ray Data pipeline and writes its output."
    )
    onnx_intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads per predictor actor.")
    max_block_retries: int = Field(
        2, ge=0, description="Times a block whose prediction raised is retried before the job fails "
        "(Ray Data max_map_retries); predictor actors that die are restarted and their blocks retried anyway.",
    )
    progress_interval_s: float = Field(1.0, gt=0, description="How often a running job records rows done.")
    min_rows_per_file: int = Field(
        250_000, gt=0, description="Rows gathered into one output file (fewer, larger files; the last may be smaller)."
    )


class TritonRuntimeSettings(_Section):
    """The ``triton`` runtime, which calls a remote V2 server that an endpoint's config.url names:
    which servers it may reach, and how long it may wait on one."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Servers the triton runtime may call, each 'host' (any port) or 'host:port', matched "
        "case-insensitively against an endpoint's config.url (whose port defaults to 80, or 443 with https). "
        "Empty (the default): every remote URL is refused, so no endpoint can make the cluster call an "
        "arbitrary host.",
    )
    max_timeout_s: float = Field(
        60.0, gt=0, description="Largest config.timeout_s a triton endpoint may set (seconds per remote call)."
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        out = []
        for entry in hosts:
            text = entry.strip().lower()
            try:
                parts = urlsplit(f"//{text}")
                ok = bool(parts.hostname) and parts.netloc == text and not parts.username
                parts.port  # noqa: B018 - raises on a port that is not a number in range
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{entry!r} is not a host or host:port; write e.g. triton.ml.svc or triton.ml.svc:8000")
            out.append(text)
        return out


class RuntimeSettings(_Section):
    """Per-runtime limits that no endpoint config can widen."""

    triton: TritonRuntimeSettings = Field(
        default_factory=TritonRuntimeSettings, description="The triton runtime (a remote V2 server)."
    )


class StorageSettings(_Section):
    """Where job specs may read and write (``dataset.uri``, ``checkpoint.storage_path``,
    ``checkpoint.resume_from``, batch ``input_uri`` / ``output_uri``): inside a data root or an
    allowed bucket, else 422 naming the field (``app.storage.paths``)."""

    data_roots: list[str] = Field(
        default_factory=list,
        description="Folders (local paths, file:// or s3://bucket/prefix) job specs may name; paths resolve "
        "(symlinks followed) inside one of them or are refused. Relative paths are taken under the first. "
        "Empty: MATIH_HOME/data and the artifact root. jobs.storage_path is always allowed for checkpoints.",
    )
    allowed_buckets: list[str] = Field(
        default_factory=list,
        description="S3 buckets job specs may name anywhere inside (names, or s3://name). Empty: the artifact "
        "root's bucket when the artifact root is s3://, else none.",
    )


class PredictionLogSettings(_Section):
    """The prediction log (``app/predlog``): every prediction through an endpoint, buffered in
    each Gateway replica, shipped in batches to the PredictionLog actor, written as parquet
    partitioned by endpoint and hour. Per-endpoint sampling, fields and retention live in the
    endpoint's spec (``spec.logging``); these are the platform-wide defaults and bounds."""

    enabled: bool = Field(
        True, description="Log predictions at all (an endpoint's spec.logging.enabled turns its own off)."
    )
    root: str = Field(
        "", description="Where the log's parquet files go (a folder, or s3://bucket/prefix); "
        "empty = <artifact_root>/prediction-log."
    )
    buffer_records: int = Field(
        50_000, ge=1, description="Records a Gateway replica holds before it drops new ones (counted in "
        "matih_prediction_log_dropped_total and GET /v1/endpoints/{name}/log/stats)."
    )
    flush_interval_s: float = Field(
        0.5, gt=0, description="How often a replica ships its buffered records to the PredictionLog actor."
    )
    flush_max_records: int = Field(
        5_000, ge=1, description="Most records in one shipment (a full shipment goes at once, not on the timer)."
    )
    write_interval_s: float = Field(
        2.0, gt=0, description="How often the PredictionLog actor writes what it received as parquet files "
        "(one file per endpoint and hour per write)."
    )
    compact_interval_s: float = Field(
        300.0, gt=0, description="How often small files of an hour partition are merged into one."
    )
    compact_min_files: int = Field(
        8, ge=2, description="An hour partition is compacted once it holds at least this many files."
    )
    retention_interval_s: float = Field(
        3600.0, gt=0, description="How often partitions past their endpoint's retention are deleted."
    )
    retention_days: int = Field(
        30, ge=1, description="Days an endpoint's predictions are kept when its spec.logging sets none."
    )
    actor_num_cpus: float = Field(0.05, ge=0, description="CPUs the PredictionLog actor reserves.")
    actor_max_pending_records: int = Field(
        1_000_000, ge=1, description="Records the PredictionLog actor holds while its storage is unreachable; "
        "past that the oldest are dropped (counted in the endpoint's log stats)."
    )
    erase_remember_s: float = Field(
        86_400.0, ge=0, description="How long an erasure (by request ids or caller) keeps dropping matching "
        "records that arrive after it ran (records still in a replica's buffer then). Held by the actor: a "
        "restart forgets it."
    )
    feedback_grace_s: float = Field(
        120.0, ge=0, description="Feedback for a request id this recent is accepted even when the log does not "
        "hold it yet (its record may still be in a replica's buffer); older unknown ids are reported per row."
    )
    feedback_max_rows: int = Field(
        10_000, ge=1, le=100_000, description="Most rows in one POST /v1/endpoints/{name}/feedback."
    )


class EventSettings(_Section):
    """Platform events (``app/events``): CloudEvents 1.0 written to the outbox table in the same
    transaction as the change, then published by the EventRelay actor to the sink."""

    sink: Literal["none", "kafka", "redis"] = Field(
        "none", description="Where the relay publishes: none (the outbox alone, GET /v1/events), kafka "
        "(KAFKA_BOOTSTRAP_SERVERS) or redis (Redis Streams on REDIS_URL)."
    )
    topic: str = Field("matih.events", min_length=1, description="Kafka topic of every event.")
    stream: str = Field("matih:events", min_length=1, description="Redis stream key of every event.")
    stream_maxlen: int = Field(
        1_000_000, ge=1, description="Redis: approximate most entries the stream keeps (XADD MAXLEN ~)."
    )
    source: str = Field("/matih-ml", min_length=1, description="The CloudEvents `source` of every event.")
    relay_interval_s: float = Field(
        0.5, gt=0, description="How often the relay looks for unpublished events when nothing woke it."
    )
    relay_batch: int = Field(500, ge=1, description="Most events the relay publishes in one round.")
    retry_max_s: float = Field(
        30.0, gt=0, description="Longest wait between publish attempts while the sink is down (backoff)."
    )
    publish_timeout_s: float = Field(
        10.0, gt=0, description="How long one publish round may wait for the sink's acknowledgement."
    )
    keep_published_days: int = Field(
        7, ge=1, description="Days published events stay in the outbox (and in GET /v1/events)."
    )


class RolloutSettings(_Section):
    """Canary rollouts (``app/rollouts``): how often the RolloutController actor judges the
    running rollouts' steps and moves them on."""

    tick_s: float = Field(
        2.0, gt=0, le=3600, description="Seconds between two rounds of the RolloutController: each round reads "
        "every running rollout's step window from the prediction log, judges it and records the decision.",
    )


class MonitoringSettings(_Section):
    """Model monitoring and the closed loop (``app/monitoring``): reference profiles made at
    registration, the DriftMonitor actor's schedule, the drift job's parallelism, alert
    delivery, and the data retraining jobs get."""

    monitor_num_cpus: float = Field(
        0.0, ge=0, description="CPUs the DriftMonitor actor reserves. It only schedules runs (each a monitor_run "
        "job, admitted like any job) and moves retraining triggers on, so it takes none by default: on 2 cores the "
        "other reservations leave exactly one CPU for a job (docs/architecture.md, 'Resources on 2 cores').",
    )
    tick_s: float = Field(
        5.0, gt=0, le=3600, description="Seconds between two rounds of the DriftMonitor: each round queues the "
        "monitors whose schedule is due and moves every open retraining trigger on (job -> gates -> rollout).",
    )
    task_num_cpus: float = Field(
        0.25, gt=0, description="CPUs of each Ray task of a drift run (a group of columns tested against the "
        "reference), inside the room the job was admitted with.",
    )
    columns_per_task: int = Field(
        50, ge=1, description="Columns one drift task tests; a window of more columns is split across tasks.",
    )
    profile_quantiles: int = Field(
        1000, ge=10, le=100_000, description="Quantiles kept per numeric column in a reference profile (the sketch "
        "distances and the plots are read from).",
    )
    profile_exact_rows: int = Field(
        1000, ge=0, description="A reference column with at most this many values keeps them all, so that the "
        "statistical tests of small references (KS, chi-square) are exact.",
    )
    profile_max_categories: int = Field(
        1000, ge=1, description="Most distinct values a categorical column's profile counts; the rest are "
        "counted together as '__other__'.",
    )
    profile_holdout_rows: int = Field(
        5000, ge=0, description="Holdout rows (predicted probabilities and labels) a profile keeps to calibrate "
        "confidence-based performance estimation (CBPE).",
    )
    max_window_rows: int = Field(
        1_000_000, ge=1, description="Most logged rows one drift run reads (the newest of the window).",
    )
    history_runs: int = Field(
        500, ge=1, description="Runs kept per monitor (GET .../drift history); older ones are deleted.",
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts (or host:port) an alert webhook may be sent to; none by default. "
        "A webhook channel naming another host is refused with 422.",
    )
    webhook_timeout_s: float = Field(5.0, gt=0, description="Time limit of one webhook attempt.")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="Attempts per webhook delivery (backoff between).")
    webhook_backoff_s: float = Field(
        0.5, gt=0, description="First wait between webhook attempts; doubles each attempt (at most 30 s).",
    )
    retrain_data_root: str = Field(
        "", description="Where retraining datasets (logged inputs joined with labels) are written; empty = "
        "MATIH_HOME/data/retraining.",
    )


class FeatureSettings(_Section):
    """The Feast feature store (``app/features``): the managed repo at ``FEAST_REPO_PATH``, its
    registry, online and offline stores and materialization engine, online reads at predict
    time, and the StreamIngestor actor's micro-batches."""

    project: str = Field(
        "matih", pattern=r"^[a-z][a-z0-9_]{0,62}$",
        description="Feast project of every definition the API makes (part of each online-store key).",
    )
    registry: str = Field(
        "", description="SQLAlchemy URL of Feast's SQL registry; empty = derived from DATABASE_URL: a SQLite file "
        "FEAST_REPO_PATH/registry.db beside a SQLite metadata store, the schema `registry_schema` of the same "
        "PostgreSQL database beside a PostgreSQL one.",
    )
    registry_schema: str = Field(
        "feast", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="PostgreSQL schema of the derived registry (created at start); Feast's tables live apart "
        "from the platform's own.",
    )
    registry_cache_ttl_s: int = Field(
        5, ge=0, description="How long each process trusts its copy of the registry (Feast's cache_ttl_seconds); "
        "definitions changed through the API refresh the Gateway replica that made them at once.",
    )
    online_store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="Where online features live: a SQLite file FEAST_REPO_PATH/online.db, or Redis "
        "(REDIS_URL).",
    )
    offline_store: Literal["file", "ray"] = Field(
        "file", description="Feast's offline store over the sources' parquet files: file (pandas/dask in the "
        "process) or ray (Feast's Ray offline store, reading with Ray Data).",
    )
    engine: Literal["ray", "local"] = Field(
        "ray", description="Feast's batch engine for materialization: ray (Feast's Ray compute engine in the "
        "platform's cluster) or local (in the job's process).",
    )
    engine_max_workers: int | None = Field(
        None, ge=1, description="Ray compute engine: most Ray workers of one materialization (None: Ray decides).",
    )
    engine_write_concurrency: int | None = Field(
        None, ge=1, description="Ray compute engine: parallel online-store writers (None: 1 on SQLite, 4 on Redis).",
    )
    online_timeout_s: float = Field(
        1.0, gt=0, description="Longest an online read at predict time may take before the request fails with 503.",
    )
    stream_poll_s: float = Field(
        0.2, gt=0, description="StreamIngestor: longest wait for new messages before a partial micro-batch is written.",
    )
    stream_batch_rows: int = Field(
        2000, ge=1, description="StreamIngestor: most rows written through the push API in one micro-batch.",
    )
    stream_rescan_s: float = Field(
        5.0, gt=0, description="StreamIngestor: how often it re-reads the push sources' stream declarations.",
    )
    ingestor_num_cpus: float = Field(
        0.0, ge=0, description="CPUs the StreamIngestor actor reserves: none by default (it mostly waits on the "
        "brokers, and on 2 cores every 0.05 counts: the platform's reservations leave exactly one CPU for a job "
        "while the ModelServer runs two replicas); give it a share where streams are busy.",
    )
    push_max_rows: int = Field(
        10_000, ge=1, description="Most rows one POST /v1/features/push may carry (more: 422; stream them instead).",
    )


class DatabaseSettings(_Section):
    """Bounds on every metadata-store call, so a stalled database fails a call instead of
    hanging the scheduler or a request (PostgreSQL; SQLite waits on its own busy timeout)."""

    connect_timeout_s: int = Field(
        10, ge=1, description="PostgreSQL: seconds to wait for a connection (libpq connect_timeout)."
    )
    statement_timeout_s: float = Field(
        30.0, gt=0, description="PostgreSQL: longest a statement may run before the server cancels it "
        "(statement_timeout of each connection)."
    )


class Settings(BaseSettings):
    """Every setting of the platform. Field names map to environment names case-insensitively."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="", case_sensitive=False, populate_by_name=True)

    profile: Literal["local", "production"] = Field(
        "local", validation_alias=AliasChoices("MATIH_PROFILE", "profile"), description="Which profile this is."
    )
    matih_home: Path = Field(
        Path("~/.matih"),
        validation_alias=AliasChoices("MATIH_HOME", "matih_home"),
        description="Where local state lives: SQLite files, artifacts, the generated admin token.",
    )
    database_url: str = Field(
        "",
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="SQLAlchemy URL of the metadata store; empty = SQLite file under MATIH_HOME. "
        "postgresql:// URLs use the psycopg 3 driver.",
    )
    mlflow_tracking_uri: str = Field(
        "",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri"),
        description="MLflow tracking and registry URI; empty = sqlite:///MATIH_HOME/mlflow.db.",
    )
    artifact_root: str = Field(
        "",
        validation_alias=AliasChoices("MATIH_ARTIFACT_ROOT", "artifact_root"),
        description="Where MLflow artifacts go for experiments the platform creates; "
        "empty = MATIH_HOME/artifacts. s3://bucket/prefix in production.",
    )
    experiment_name: str = Field(
        "matih",
        validation_alias=AliasChoices("MATIH_EXPERIMENT", "experiment_name"),
        description="MLflow experiment that training jobs log to.",
    )
    mlflow_request_timeout_s: int = Field(
        30, ge=1, validation_alias=AliasChoices("MATIH_MLFLOW_TIMEOUT_S", "mlflow_request_timeout_s"),
        description="MLflow request timeout for training and registry work.",
    )
    mlflow_request_retries: int = Field(
        3, ge=0, validation_alias=AliasChoices("MATIH_MLFLOW_RETRIES", "mlflow_request_retries"),
        description="Retries of a failed MLflow request (with backoff) for training and registry work.",
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("RAY_ADDRESS", "ray_address"),
        description="Address of an existing Ray cluster; unset = a local cluster.",
    )
    feast_repo_path: str = Field(
        "", validation_alias=AliasChoices("FEAST_REPO_PATH", "feast_repo_path"),
        description="The managed Feast repository (feature_store.yaml, rendered from configs/feast/ at start); "
        "empty = MATIH_HOME/feature_repo.",
    )
    s3_endpoint: str = Field(
        "", validation_alias=AliasChoices("S3_ENDPOINT", "s3_endpoint"), description="S3 / MinIO endpoint URL."
    )
    s3_access_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("S3_ACCESS_KEY", "s3_access_key"), description="S3 key id."
    )
    s3_secret_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("S3_SECRET_KEY", "s3_secret_key"), description="S3 secret."
    )
    redis_url: str = Field(
        "", validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis: online features, and the event stream when events.sink is redis.",
    )
    kafka_bootstrap_servers: str = Field(
        "", validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="Kafka brokers (host:port,...) the event relay publishes to when events.sink is kafka.",
    )
    admin_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("MATIH_ADMIN_TOKEN", "admin_token"),
        description="The admin bearer token. Required by the production profile.",
    )
    http_port: int = Field(
        8000,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("MATIH_HTTP_PORT", "http_port"),
        description="Port of the Serve HTTP proxy.",
    )
    grpc_port: int = Field(
        9000,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("MATIH_GRPC_PORT", "grpc_port"),
        description="Port of Serve's gRPC proxy, which serves the Open Inference Protocol over gRPC "
        "(inference.GRPCInferenceService); `matih-ml up` writes it into grpc_options.port of the serve config.",
    )

    # Sections are set in the profile YAML (or as JSON in MATIH_<SECTION>, e.g. MATIH_JOBS).
    auth: AuthSettings = Field(default_factory=AuthSettings, validation_alias=AliasChoices("MATIH_AUTH", "auth"))
    http: HttpSettings = Field(default_factory=HttpSettings, validation_alias=AliasChoices("MATIH_HTTP", "http"))
    serving: ServingSettings = Field(
        default_factory=ServingSettings, validation_alias=AliasChoices("MATIH_SERVING", "serving")
    )
    jobs: JobSettings = Field(default_factory=JobSettings, validation_alias=AliasChoices("MATIH_JOBS", "jobs"))
    actors: ActorSettings = Field(default_factory=ActorSettings, validation_alias=AliasChoices("MATIH_ACTORS", "actors"))
    batch: BatchSettings = Field(default_factory=BatchSettings, validation_alias=AliasChoices("MATIH_BATCH", "batch"))
    registry: RegistrySettings = Field(
        default_factory=RegistrySettings, validation_alias=AliasChoices("MATIH_REGISTRY", "registry")
    )
    runtimes: RuntimeSettings = Field(
        default_factory=RuntimeSettings, validation_alias=AliasChoices("MATIH_RUNTIMES", "runtimes")
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings, validation_alias=AliasChoices("MATIH_STORAGE", "storage")
    )
    database: DatabaseSettings = Field(
        default_factory=DatabaseSettings, validation_alias=AliasChoices("MATIH_DATABASE", "database")
    )
    predlog: PredictionLogSettings = Field(
        default_factory=PredictionLogSettings, validation_alias=AliasChoices("MATIH_PREDLOG", "predlog")
    )
    events: EventSettings = Field(
        default_factory=EventSettings, validation_alias=AliasChoices("MATIH_EVENTS", "events")
    )
    features: FeatureSettings = Field(
        default_factory=FeatureSettings, validation_alias=AliasChoices("MATIH_FEATURES", "features")
    )
    rollouts: RolloutSettings = Field(
        default_factory=RolloutSettings, validation_alias=AliasChoices("MATIH_ROLLOUTS", "rollouts")
    )
    monitoring: MonitoringSettings = Field(
        default_factory=MonitoringSettings, validation_alias=AliasChoices("MATIH_MONITORING", "monitoring")
    )

    @model_validator(mode="after")
    def _derive_and_check(self) -> "Settings":
        self.matih_home = Path(os.path.expanduser(str(self.matih_home))).resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.matih_home / 'matih.db'}"
        if not self.mlflow_tracking_uri:
            self.mlflow_tracking_uri = f"sqlite:///{self.matih_home / 'mlflow.db'}"
        if not self.artifact_root:
            self.artifact_root = str(self.matih_home / "artifacts")
        if not self.storage.data_roots:
            self.storage.data_roots = [str(self.matih_home / "data"), self.artifact_root]
        if not self.storage.allowed_buckets and self.artifact_root.startswith(("s3://", "s3a://")):
            self.storage.allowed_buckets = [self.artifact_root.split("://", 1)[1].split("/", 1)[0]]
        if not self.feast_repo_path:
            self.feast_repo_path = str(self.matih_home / "feature_repo")
        if self.features.online_store == "redis" and not self.redis_url:
            raise ValueError("features.online_store redis needs REDIS_URL (redis://host:port/db)")
        if not self.predlog.root:
            self.predlog.root = self.artifact_root.rstrip("/") + "/prediction-log"
        if self.events.sink == "kafka" and not self.kafka_bootstrap_servers:
            raise ValueError("events.sink kafka needs KAFKA_BOOTSTRAP_SERVERS (host:port of the brokers)")
        if self.events.sink == "redis" and not self.redis_url:
            raise ValueError("events.sink redis needs REDIS_URL (redis://host:port/db)")
        if self.database_url.startswith("postgresql://"):
            self.database_url = "postgresql+psycopg://" + self.database_url[len("postgresql://") :]
        return self

    def check_admin_token(self) -> None:
        """Refuse a profile that needs an admin token (``auth.generate_admin_token: false``)
        when none is set. Only the processes that start or serve the platform need one."""
        if self.auth.enabled and self.admin_token is None and not self.auth.generate_admin_token:
            raise ConfigError(
                f"the {self.profile} profile needs an admin token: set MATIH_ADMIN_TOKEN "
                "(or auth.generate_admin_token: true, for a single-user machine)"
            )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The profile YAML is passed in as init kwargs by load_settings, underneath the explicit ones.
        return (init_settings, _OperatorEnvironment(settings_cls))

    def public_dict(self) -> dict[str, Any]:
        """Settings without secrets, for /v1/info and logs."""
        data = self.model_dump(mode="json", exclude={"s3_access_key", "s3_secret_key", "admin_token"})
        data["admin_token_configured"] = self.admin_token is not None
        return data

    def retrain_data_root(self) -> str:
        """Where retraining datasets are written (``monitoring.retrain_data_root``, else
        ``MATIH_HOME/data/retraining``: under the default data root, so training jobs may read it)."""
        return self.monitoring.retrain_data_root or str(self.matih_home / "data" / "retraining")

    def train_storage_path(self) -> str:
        """jobs.storage_path, or MATIH_HOME/train_results when it is empty."""
        return self.jobs.storage_path or str(Path(self.matih_home) / "train_results")

    def to_init_kwargs(self) -> dict[str, Any]:
        """A plain dict that rebuilds these exact settings in another process (secrets included).
        For this process's own use (tests, benchmarks); actors and jobs get :meth:`shared_kwargs`."""
        data = self.model_dump(mode="json")
        for key in SECRET_FIELDS:
            value = getattr(self, key)
            data[key] = value.get_secret_value() if value is not None else None
        return data

    def shared_kwargs(self) -> dict[str, Any]:
        """The settings another process may be handed (an actor's constructor argument, what
        ``JobScheduler.settings()`` answers): no admin token, no S3 keys, and the URLs of
        :data:`CREDENTIAL_URL_FIELDS` without their password. The process reads those from its
        own environment (:meth:`credential_env`, :meth:`from_shared`)."""
        data = self.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        for key in CREDENTIAL_URL_FIELDS:
            data[key] = _without_password(data[key])
        return data

    def credential_env(self, process: str) -> dict[str, str]:
        """``{ENV_NAME: value}`` of the credentials ``process`` (a key of
        :data:`CREDENTIALS_BY_PROCESS`) needs: the runtime_env ``env_vars`` its creator sets."""
        out: dict[str, str] = {}
        for key in CREDENTIALS_BY_PROCESS[process]:
            value = getattr(self, key)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value:
                out[env_name(Settings.model_fields[key])] = str(value)
        return out

    @classmethod
    def from_shared(cls, kwargs: dict[str, Any]) -> "Settings":
        """Rebuild settings from :meth:`shared_kwargs` in this process: each credential (admin
        token, S3 keys, the full database / MLflow / Redis URL) comes from this process's
        environment where it names one (``DATABASE_URL``, ``S3_SECRET_KEY``, ...), else the
        shared value stands (a URL without password, no key)."""
        env = {k.upper() for k in os.environ}
        data = dict(kwargs)
        for key in (*SECRET_FIELDS, *CREDENTIAL_URL_FIELDS):
            if env_name(cls.model_fields[key]).upper() in env:
                data.pop(key, None)
        return cls(**data)


# Never handed to another process as an argument: each reaches only the processes that need
# it, through their environment.
SECRET_FIELDS = ("admin_token", "s3_access_key", "s3_secret_key")
# Handed to other processes without their password; the full URL travels in the environment.
CREDENTIAL_URL_FIELDS = ("database_url", "mlflow_tracking_uri", "redis_url")
# Which credentials each kind of process gets in its environment (Ray runtime_env env_vars):
# the application builder sets them for the deployments and actors, the JobScheduler for
# each job it submits. The ModelServer gets none: models reach it through the RegistryCache.
CREDENTIALS_BY_PROCESS: dict[str, tuple[str, ...]] = {
    # online features and pushes (Redis), the Feast registry (beside the metadata store)
    "gateway": ("admin_token", "database_url", "mlflow_tracking_uri", "redis_url", "s3_access_key", "s3_secret_key"),
    "model_server": (),
    "registry_cache": ("database_url", "mlflow_tracking_uri", "s3_access_key", "s3_secret_key"),  # trust records, outbox
    "job_scheduler": ("database_url", "mlflow_tracking_uri", "redis_url", "s3_access_key", "s3_secret_key"),
    "job": ("database_url", "mlflow_tracking_uri", "redis_url", "s3_access_key", "s3_secret_key"),  # + materialization
    "event_relay": ("database_url", "redis_url"),  # reads the outbox, publishes to the sink
    "prediction_log": ("database_url", "s3_access_key", "s3_secret_key"),  # endpoints' retention; the files
    # rollouts in the store, aliases in MLflow, the prediction log's files
    "rollout_controller": ("database_url", "mlflow_tracking_uri", "s3_access_key", "s3_secret_key"),
    "stream_ingestor": ("database_url", "redis_url"),  # the Feast registry; online features, Redis Streams
    # monitors, alerts and triggers in the store; versions and aliases in MLflow; the log's files
    "drift_monitor": ("database_url", "mlflow_tracking_uri", "s3_access_key", "s3_secret_key"),
}


def _without_password(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part left out (user and host kept)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))


def env_name(field) -> str | None:
    """The documented environment name of a field: the first of its validation aliases."""
    alias = field.validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str) else None


class _OperatorEnvironment(PydanticBaseSettingsSource):
    """Reads only the documented environment names (DATABASE_URL, MATIH_HOME, MATIH_JOBS, ...).
    pydantic-settings' own source would also read a variable that merely equals a field
    name, so a stray PROFILE or HTTP in someone's shell would change the platform."""

    def get_field_value(self, field, field_name):  # required by the base class; unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {k.upper(): v for k, v in os.environ.items()}
        out: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            key = env_name(field)
            if key is None or key.upper() not in env:
                continue
            value: Any = env[key.upper()]
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise ConfigError(f"{key}: not valid JSON for the '{name}' section ({exc})") from None
            out[name] = value
        return out


def _read_profile(profile: str, config_dir: Path) -> dict[str, Any]:
    if profile not in PROFILES and not (config_dir / f"{profile}.yaml").exists():
        raise ConfigError(
            f"unknown profile {profile!r}: set MATIH_PROFILE to one of {', '.join(PROFILES)} "
            f"or add {config_dir / (profile + '.yaml')}"
        )
    path = config_dir / f"{profile}.yaml"
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of setting names to values")
    return data


def _explain(exc: ValidationError, source: str) -> str:
    known = sorted(Settings.model_fields)
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(settings)"
        field = Settings.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        env_key = env_name(field) if field is not None else None
        if env_key and env_key.upper() in {k.upper() for k in os.environ}:
            key = f"{key} (from {env_key})"
        if err["type"] == "extra_forbidden":
            section = Settings.model_fields.get(str(err["loc"][0])) if len(err["loc"]) > 1 else None
            annotation = getattr(section, "annotation", None)
            names = sorted(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else known
            lines.append(f"  - {key}: unknown key; remove it or use one of: {', '.join(names)}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  - {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_settings(
    profile: str | None = None, config_dir: Path | None = None, *, need_admin_token: bool = True, **overrides: Any
) -> Settings:
    """Build the settings for ``profile`` (default: ``$MATIH_PROFILE`` or ``local``).

    ``overrides`` win over the environment and the profile; keys are field names.
    ``need_admin_token=False`` for processes that never check a token (a job run by hand).
    """
    config_dir = config_dir or CONFIG_DIR
    profile = profile or os.environ.get("MATIH_PROFILE") or "local"
    data = _read_profile(profile, config_dir)
    data["profile"] = profile
    # Environment beats the profile file: drop file keys the environment sets.
    set_in_env = {name.upper() for name in os.environ}
    for name, field in Settings.model_fields.items():
        key = env_name(field)
        if name in data and key is not None and key.upper() in set_in_env:
            data.pop(name)
    data.update(overrides)
    source = f"profile {config_dir / (profile + '.yaml')}, environment and arguments"
    try:
        # Profile values go in as init kwargs; pydantic-settings then gives them precedence over
        # the environment, which is why environment-set keys were removed from ``data`` above.
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None
    except ValueError as exc:  # pragma: no cover - raised by validators outside pydantic's wrapping
        raise ConfigError(f"invalid configuration ({source}): {exc}") from None
    if need_admin_token:
        settings.check_admin_token()
    return settings
