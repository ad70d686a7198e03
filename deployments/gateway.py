"""Gateway: the FastAPI ingress. It builds an ApiContext whose services are Ray-backed
(the ModelServer handle, the JobScheduler actor) and serves ``app.api.app.create_app`` over
HTTP, and the Open Inference Protocol's gRPC service (``app.api.v2_grpc``) over Serve's gRPC
ingress: Serve calls the Gateway method named like the RPC."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import ray
from cachetools import LRUCache, TTLCache
from ray import serve
from ray.serve.handle import DeploymentHandle
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from app.api.v2_grpc import UNARY_RPCS
from app.errors import Conflict, DependencyUnavailable, MatihError, ModelError, Overloaded, RequestTimeout
from app.registry.targets import model_name_of
from app.serving.loader import model_id_for
from app.serving.routing import ENDPOINT_KEY_PREFIX, endpoint_key
from app.waits import bounded

_RESOLVE_CACHE_SIZE = 4096  # alias resolutions a Gateway replica keeps (least recently used go first)
_ENSEMBLE_MARGIN_S = 2.0  # an Ensemble call's limit past its members' (their timeouts answer first)


def _matih_cause(exc: ray.exceptions.RayTaskError) -> Exception:
    """The MatihError a failed Ray task raised (the caller's 4xx, say), else ``exc`` itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MatihError) else exc


class _ReplicaGone(Exception):
    """The ModelServer replica of a call died or cannot be reached; the call may go again."""


class _ServePredictor:
    """ModelServer calls; endpoints whose config says ``"device": "gpu"`` go to the GPU pool.

    A call is bounded by ``timeout_s`` (504 past it, a model load included) and sent again, up
    to ``retries`` times, when its replica died under it: a prediction has no side effects, and
    Serve routes the next try to a live replica (or waits for the replacement)."""

    def __init__(
        self, handle: DeploymentHandle, gpu_handle: DeploymentHandle | None = None, grpc: bool = True,
        *, timeout_s: float = 30.0, retries: int = 2, inline=None, ensemble: DeploymentHandle | None = None,
    ):
        """``inline``: a :class:`deployments.model_host.ModelHost` of this replica, which serves
        the endpoints placed in the Gateway (``serves_in_gateway``); None = every call goes
        to a ModelServer replica. ``ensemble``: the Ensemble deployment, which runs the fan-out
        of ensembles placed on the model servers (app.ensembles.serving; ``predict_ensemble``)."""
        # _by_reference=False: Serve's direct gRPC channel to the replica instead of a Ray
        # actor task per call (payloads and results are small JSON-like values).
        self.handle = handle.options(_by_reference=False) if grpc else handle
        self.gpu_handle = (gpu_handle.options(_by_reference=False) if grpc else gpu_handle) if gpu_handle else None
        self.timeout_s = timeout_s
        self.retries = retries
        self.inline = inline
        self._calls: LRUCache = LRUCache(maxsize=_RESOLVE_CACHE_SIZE)  # (pool, model id) -> bound handle method
        self._ensemble = (ensemble.options(_by_reference=False) if grpc else ensemble).run if ensemble else None

    def runs_inline(self, member) -> bool:
        """Whether an ensemble member (app.ensembles.definition.PinnedMember) runs in this replica."""
        from app.serving.endpoint_config import serves_in_gateway

        return self.inline is not None and serves_in_gateway(member.runtime, member.config, True)

    async def predict(
        self, model, payload: dict[str, Any], runtime: str = "onnx", config: dict | None = None, *, batch: bool = True
    ) -> dict[str, Any]:
        """``batch=False``: an ensemble member's call (see ModelHost.predict_model)."""
        from app.serving.endpoint_config import serves_in_gateway

        model_id = model_id_for(model, runtime, config)
        if self.inline is not None and serves_in_gateway(runtime, config, True):
            try:
                async with asyncio.timeout(self.timeout_s):  # no task per request, unlike wait_for
                    return await self.inline.predict_model(model_id, payload, config, batch)
            except TimeoutError:
                raise self._timeout(model_id) from None
        gpu = (config or {}).get("device") == "gpu" and self.gpu_handle is not None
        call = self._calls.get((gpu, model_id))
        if call is None:  # handle options are built once per model, not per request
            handle = self.gpu_handle if gpu else self.handle
            call = self._calls[(gpu, model_id)] = handle.options(multiplexed_model_id=model_id).predict
        args = (payload, config) if batch else (payload, config, False)
        return await self._remote(call, args, model_id, self.timeout_s)

    async def predict_ensemble(
        self, model, payload: dict[str, Any], config: dict | None, explain: bool, timeout_s: float
    ) -> dict[str, Any]:
        """The fan-out of ensemble ``model`` in the Ensemble deployment; ``timeout_s``: its members'
        limit (the whole call gets a little more, so that a member's timeout answers degraded
        rather than this call's 504)."""
        if self._ensemble is None:
            raise Conflict(f"ensemble {model.model_id} is placed on the Ensemble deployment, which this process lacks")
        return await self._remote(
            self._ensemble, (model, payload, config, explain), model.model_id, timeout_s + _ENSEMBLE_MARGIN_S
        )

    async def _remote(self, call, args: tuple, model_id: str, timeout_s: float) -> Any:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=0.25, max=2.0),
            retry=retry_if_exception_type(_ReplicaGone),
            reraise=True,
        )

        async def attempts() -> Any:
            async for attempt in retrying:
                with attempt:
                    return await self._call(call, *args)

        try:
            out = await asyncio.wait_for(attempts(), timeout_s)
        except TimeoutError:
            raise self._timeout(model_id, timeout_s) from None
        except _ReplicaGone as exc:
            raise DependencyUnavailable(f"model server unavailable: {exc}", retry_after_s=2) from None
        if isinstance(out, MatihError):  # the caller's error, handed back as a value (see ModelServer.predict)
            raise out
        return out

    def _timeout(self, model_id: str, timeout_s: float | None = None) -> RequestTimeout:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        return RequestTimeout(
            f"model {model_id} did not answer within {timeout_s:g} s (serving.predict_timeout_s)",
            details={"timeout_s": timeout_s},
        )

    @staticmethod
    async def _call(call, *args: Any) -> Any:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        gone = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        try:
            return await call.remote(*args)
        except MatihError:
            raise  # raised in the replica: same class, same message (RayTaskError subclasses it)
        except BackPressureError:
            raise Overloaded("the model servers are at their request limit; retry shortly", retry_after_s=1) from None
        except DeploymentUnavailableError as exc:
            raise DependencyUnavailable(f"the model servers are unavailable: {exc}", retry_after_s=5) from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), gone):
                raise _ReplicaGone(str(exc.cause)) from None
            raise _matih_cause(exc) from None
        except gone as exc:
            raise _ReplicaGone(str(exc)) from None


class _CachedResolver:
    """Alias resolution through the RegistryCache actor, cached in this replica and dropped
    the moment the actor announces a change (a long poll runs in the background). The same
    feed carries endpoint changes (``endpoint:<name>``, see app.serving.routing), handed to
    ``on_endpoint`` (name, or None for "drop every endpoint")."""

    def __init__(self, actor, ttl_s: float, timeout_s: float = 30.0):
        self.actor = actor
        self.timeout_s = timeout_s
        self._cache: TTLCache = TTLCache(maxsize=_RESOLVE_CACHE_SIZE, ttl=ttl_s)
        self._epoch = 0
        self._watcher: asyncio.Task | None = None
        self.on_endpoint: Callable[[str | None], None] = lambda name: None

    def _ensure_watching(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def resolve(self, ref, use_cache: bool = True):
        self._ensure_watching()
        key = str(ref)
        model = self._cache.get(key) if use_cache else None
        if model is not None:
            return model
        try:
            model = await bounded(self.actor.resolve.remote(key), self.timeout_s, "the registry cache")
        except MatihError:
            raise
        except ray.exceptions.RayTaskError as exc:
            raise _matih_cause(exc) from None
        self._cache[key] = model
        return model

    def drop(self, name: str | None) -> None:
        if name is None:
            self._cache.clear()
        else:
            for key in [k for k in list(self._cache.keys()) if model_name_of(k) == name]:
                self._cache.pop(key, None)

    async def changed(self, name: str) -> None:
        self.drop(name)
        await bounded(self.actor.invalidate.remote(name), self.timeout_s, "the registry cache")

    async def endpoint_changed(self, name: str) -> None:
        self._ensure_watching()
        await bounded(self.actor.invalidate.remote(endpoint_key(name)), self.timeout_s, "the registry cache")

    def _drop_all(self) -> None:
        self._cache.clear()
        self.on_endpoint(None)

    async def _watch(self) -> None:
        while True:
            try:
                epoch, names = await bounded(
                    self.actor.changes_since.remote(self._epoch, 30.0), 30.0 + self.timeout_s, "the registry cache"
                )
            except Exception:  # actor restarting: its epochs start over, so forget everything
                self._drop_all()
                self._epoch = 0
                await asyncio.sleep(1.0)
                continue
            if names is None:
                self._drop_all()
            else:
                for name in names:
                    if name.startswith(ENDPOINT_KEY_PREFIX):
                        self.on_endpoint(name[len(ENDPOINT_KEY_PREFIX):])
                    else:
                        self.drop(name)
            self._epoch = epoch


class _SchedulerControl:
    def __init__(
        self, settings_kwargs: dict[str, Any], num_cpus: float, timeout_s: float = 30.0,
        env_vars: dict[str, str] | None = None,
    ):
        from actors.job_scheduler import get_job_scheduler

        self.actor = get_job_scheduler(settings_kwargs, num_cpus, env_vars)
        self.timeout_s = timeout_s

    async def notify(self) -> None:
        await bounded(self.actor.notify.remote(), self.timeout_s, "the job scheduler")

    async def cancel(self, job_id: str, actor: str) -> dict[str, Any]:
        return await bounded(self.actor.cancel.remote(job_id, actor), self.timeout_s, "the job scheduler")

    async def ping(self) -> None:
        await bounded(self.actor.ping.remote(), self.timeout_s, "the job scheduler")


class _GpuControl:
    """GPU inventory from the GPUManager actor."""

    def __init__(self, num_cpus: float, timeout_s: float = 30.0):
        from actors.gpu_manager import get_gpu_manager

        self.actor = get_gpu_manager(num_cpus)
        self.timeout_s = timeout_s

    async def snapshot(self) -> dict[str, Any]:
        return await bounded(self.actor.snapshot.remote(), self.timeout_s, "the GPU manager")

    async def ping(self) -> None:
        await bounded(self.actor.ping.remote(), self.timeout_s, "the GPU manager")


def _stream_status(timeout_s: float) -> Callable[[], Any]:
    """The StreamIngestor's status, found by name at each call (a restarted actor keeps its
    name; an absent one is a 503 the route turns into "not_running")."""

    async def status() -> dict[str, Any]:
        from actors.stream_ingestor import find_stream_ingestor

        actor = await asyncio.to_thread(find_stream_ingestor)
        if actor is None:
            raise DependencyUnavailable("the StreamIngestor actor is not running")
        return await bounded(actor.status.remote(), timeout_s, "the StreamIngestor")

    return status


@ray.remote(max_retries=0)
def _registry_task(settings_kwargs: dict[str, Any], method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
    """One RegistryService call (a registration that converts a model file) in a worker
    process of its own, with its own MLflow client and metadata-store connection."""
    from app.registry.mlflow_registry import ModelRegistry
    from app.registry.service import RegistryService
    from app.settings import Settings
    from app.store import MetadataStore

    settings = Settings.from_shared(settings_kwargs)  # credentials: the Gateway's environment, inherited
    store = MetadataStore.from_settings(settings)
    try:
        # serving=True: MLflow calls time out as the Gateway's own registry calls do, and are not
        # retried, so a request made while MLflow is down gets its 503 at once
        registry = ModelRegistry(settings, serving=True)
        if ":" in method:  # "module:function" (ApiContext.registry_offload)
            import importlib

            module, _, func = method.partition(":")
            return getattr(importlib.import_module(module), func)(settings, registry, store, *args, **kwargs)
        return getattr(RegistryService(settings, registry, store), method)(*args, **kwargs)
    finally:
        store.engine.dispose()


def _registry_offload(settings_kwargs: dict[str, Any], num_cpus: float, timeout_s: float = 50.0):
    task = _registry_task.options(num_cpus=num_cpus)

    async def offload(method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            # Past the limit the task is left to finish (no ray.cancel): a registration stopped
            # half-way is worse than one that completes after its caller stopped waiting.
            return await bounded(
                task.remote(settings_kwargs, method, args, kwargs), timeout_s,
                "the task that checks and converts the model (it may still finish: list the model's versions "
                "before retrying)",
                retry_after_s=5,
            )
        except MatihError:
            raise
        except ray.exceptions.RayTaskError as exc:
            raise _matih_cause(exc) from None
        except (ray.exceptions.OutOfMemoryError, ray.exceptions.WorkerCrashedError) as exc:
            raise ModelError(
                f"the worker that checks and converts the model died ({type(exc).__name__}); nothing was "
                "registered. A model this large may need more memory on the cluster's nodes"
            ) from None

    return offload


def _cluster_resources(timeout_s: float):
    async def resources() -> dict[str, float]:
        return await bounded(asyncio.to_thread(ray.cluster_resources), timeout_s, "the Ray cluster (GCS)")

    return resources


def _pinger(actor, timeout_s: float):
    async def ping() -> None:
        await bounded(actor.health.remote(), timeout_s, "the registry cache")

    return ping


class _GrpcMethods:
    """inference.GRPCInferenceService on the ingress (grpc_options in serve_config.yaml):
    Serve's gRPC proxy calls the ingress method named like the RPC, with its
    RayServegRPCContext as ``grpc_context``; each hands the call to ``self._grpc``."""


def _forward(name: str):
    async def method(self, request, grpc_context=None):
        return await getattr(self._grpc, name)(request, grpc_context)

    method.__name__ = method.__qualname__ = name
    return method


for _name in UNARY_RPCS:
    setattr(_GrpcMethods, _name, _forward(_name))


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress()
class Gateway(_GrpcMethods):
    def __init__(
        self,
        settings_kwargs: dict[str, Any],
        model_server: DeploymentHandle,
        gpu_pool: DeploymentHandle | None = None,
        ensemble: DeploymentHandle | None = None,
    ):
        """``settings_kwargs``: ``Settings.shared_kwargs()``; the admin token, the metadata store
        and MLflow URLs and the S3 keys come from this replica's environment (runtime_env
        env_vars the builder sets: ``Settings.credential_env("gateway")``)."""
        from app.api.app import ApiContext
        from app.auth import Authenticator
        from app.registry.mlflow_registry import ModelRegistry
        from app.settings import Settings
        from app.store import MetadataStore

        from actors.prediction_log import get_prediction_log
        from actors.registry_cache import get_registry_cache
        from app.predlog.buffer import PredictionLogBuffer
        from app.predlog.control import ActorPredictionLog
        from app.ensembles.serving import ensemble_dispatch, release_dir
        from deployments.model_host import ModelHost
        from deployments.model_server import _fetch_from_object_store, registry_cache_loader

        settings = Settings.from_shared(settings_kwargs)
        store = MetadataStore.from_settings(settings)
        timeout_s = settings.serving.actor_timeout_s
        scheduler = _SchedulerControl(
            settings_kwargs, settings.actors.num_cpus, timeout_s, settings.credential_env("job_scheduler")
        )
        cache = get_registry_cache(settings_kwargs, settings.actors.num_cpus, settings.credential_env("registry_cache"))
        admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        resolver = _CachedResolver(cache, settings.serving.resolve_ttl_s, timeout_s)

        async def ray_ready() -> None:
            await asyncio.to_thread(ray.cluster_resources)

        gpus = _GpuControl(settings.actors.num_cpus, timeout_s)
        # The prediction log: records go into this replica's buffer on the request path and are
        # shipped in batches to the PredictionLog actor, which writes the parquet files.
        predlog = ActorPredictionLog(get_prediction_log(settings_kwargs, settings), timeout_s)
        self._buffer = PredictionLogBuffer.from_settings(settings, predlog.write)
        predictor = _ServePredictor(
            model_server, gpu_pool, grpc=settings.serving.handle_grpc,
            timeout_s=settings.serving.predict_timeout_s, retries=settings.serving.replica_retries,
            inline=ModelHost(settings, registry_cache_loader(settings, cache)) if settings.serving.inline_onnx
            else None,
            ensemble=ensemble,
        )
        self.ctx = ApiContext(
            settings=settings,
            store=store,
            registry=ModelRegistry(settings, serving=True),
            authenticator=Authenticator(settings, store, admin_token),
            predictor=predictor,
            # ensembles: the fan-out here or in the Ensemble deployment; meta-learners through the
            # RegistryCache's packed artifacts, unpacked to a temporary directory
            ensembles=ensemble_dispatch(
                predictor, settings,
                fetch=lambda model: _fetch_from_object_store(cache, model.model_id, settings.serving.model_fetch_timeout_s),
                release=release_dir,
                remote=predictor.predict_ensemble if ensemble is not None else None,
                on_loop=predictor.runs_inline,
            ),
            gpu_pool=gpu_pool is not None,
            jobs=scheduler,
            resolver=resolver,
            model_changed=resolver.changed,
            endpoint_changed=resolver.endpoint_changed,
            readiness={"ray": ray_ready, "job_scheduler": scheduler.ping, "registry_cache": _pinger(cache, timeout_s),
                       "gpu_manager": gpus.ping},
            cluster_resources=_cluster_resources(timeout_s),
            gpus=gpus,
            registry_offload=_registry_offload(
                settings_kwargs, settings.registry.convert_num_cpus, settings.registry.convert_timeout_s
            ),
            prediction_buffer=self._buffer,
            predlog=predlog,
            streams=_stream_status(timeout_s),
        )

        resolver.on_endpoint = self.ctx.forget_endpoint
        from app.api.v2_grpc import InferenceService

        self._grpc = InferenceService(self.ctx)

    async def __del__(self):
        """Serve calls this when the replica shuts down: the buffered prediction-log records are
        shipped before it goes (a replica that dies without it loses at most its buffer)."""
        try:
            await self._buffer.close()
        except Exception:  # noqa: BLE001 - the actor may be gone too; the loss is the buffer's, counted
            pass

    def __serve_build_asgi_app__(self):
        from app.api.app import create_app

        return create_app(self.ctx)
