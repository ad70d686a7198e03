"""Gateway: the FastAPI ingress. It builds an ApiContext whose services are Ray-backed
(the ModelServer handle, the JobScheduler actor) and serves ``app.api.app.create_app``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.errors import DependencyUnavailable, MatihError, ModelError, Overloaded
from app.registry.targets import model_name_of
from app.serving.loader import model_id_for


def _matih_cause(exc: ray.exceptions.RayTaskError) -> Exception:
    """The MatihError a failed Ray task raised (the caller's 4xx, say), else ``exc`` itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MatihError) else exc


class _ServePredictor:
    """ModelServer calls; endpoints whose config says ``"device": "gpu"`` go to the GPU pool."""

    def __init__(self, handle: DeploymentHandle, gpu_handle: DeploymentHandle | None = None, grpc: bool = True):
        # _by_reference=False: Serve's direct gRPC channel to the replica instead of a Ray
        # actor task per call (payloads and results are small JSON-like values).
        self.handle = handle.options(_by_reference=False) if grpc else handle
        self.gpu_handle = (gpu_handle.options(_by_reference=False) if grpc else gpu_handle) if gpu_handle else None

    async def predict(
        self, model, payload: dict[str, Any], runtime: str = "onnx", config: dict | None = None
    ) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        model_id = model_id_for(model, runtime, config)
        try:
            handle = self.gpu_handle if (config or {}).get("device") == "gpu" and self.gpu_handle else self.handle
            out = await handle.options(multiplexed_model_id=model_id).predict.remote(payload, config)
        except MatihError:
            raise  # raised in the replica: same class, same message (RayTaskError subclasses it)
        except BackPressureError:
            raise Overloaded("the model servers are at their request limit; retry shortly", retry_after_s=1) from None
        except ray.exceptions.RayTaskError as exc:
            raise _matih_cause(exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise DependencyUnavailable(f"model server unavailable: {exc}", retry_after_s=2) from None
        if isinstance(out, MatihError):  # the caller's error, handed back as a value (see ModelServer.predict)
            raise out
        return out


class _CachedResolver:
    """Alias resolution through the RegistryCache actor, cached in this replica and dropped
    the moment the actor announces a change (a long poll runs in the background)."""

    def __init__(self, actor, ttl_s: float):
        self.actor = actor
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Any]] = {}
        self._epoch = 0
        self._watcher: asyncio.Task | None = None

    async def resolve(self, ref, use_cache: bool = True):
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        key = str(ref)
        now = time.monotonic()
        hit = self._cache.get(key)
        if use_cache and hit is not None and hit[0] > now:
            return hit[1]
        try:
            model = await self.actor.resolve.remote(key)
        except MatihError:
            raise
        except ray.exceptions.RayTaskError as exc:
            raise _matih_cause(exc) from None
        self._cache[key] = (now + self.ttl_s, model)
        return model

    def drop(self, name: str | None) -> None:
        if name is None:
            self._cache.clear()
        else:
            for key in [k for k in self._cache if model_name_of(k) == name]:
                del self._cache[key]

    async def changed(self, name: str) -> None:
        self.drop(name)
        await self.actor.invalidate.remote(name)

    async def _watch(self) -> None:
        while True:
            try:
                epoch, names = await self.actor.changes_since.remote(self._epoch, 30.0)
            except Exception:  # actor restarting: its epochs start over, so forget everything
                self._cache.clear()
                self._epoch = 0
                await asyncio.sleep(1.0)
                continue
            if names is None:
                self._cache.clear()
            else:
                for name in names:
                    self.drop(name)
            self._epoch = epoch


class _SchedulerControl:
    def __init__(self, settings_kwargs: dict[str, Any], num_cpus: float, env_vars: dict[str, str] | None = None):
        from actors.job_scheduler import get_job_scheduler

        self.actor = get_job_scheduler(settings_kwargs, num_cpus, env_vars)

    async def notify(self) -> None:
        await self.actor.notify.remote()

    async def cancel(self, job_id: str, actor: str) -> dict[str, Any]:
        return await self.actor.cancel.remote(job_id, actor)

    async def ping(self) -> None:
        await self.actor.ping.remote()


class _GpuControl:
    """GPU inventory from the GPUManager actor."""

    def __init__(self, num_cpus: float):
        from actors.gpu_manager import get_gpu_manager

        self.actor = get_gpu_manager(num_cpus)

    async def snapshot(self) -> dict[str, Any]:
        return await self.actor.snapshot.remote()

    async def ping(self) -> None:
        await self.actor.ping.remote()


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
        return getattr(RegistryService(settings, registry, store), method)(*args, **kwargs)
    finally:
        store.engine.dispose()


def _registry_offload(settings_kwargs: dict[str, Any], num_cpus: float):
    task = _registry_task.options(num_cpus=num_cpus)

    async def offload(method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await task.remote(settings_kwargs, method, args, kwargs)
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


async def _cluster_resources() -> dict[str, float]:
    return await asyncio.to_thread(ray.cluster_resources)


def _pinger(actor):
    async def ping() -> None:
        await actor.health.remote()

    return ping


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress()
class Gateway:
    def __init__(
        self,
        settings_kwargs: dict[str, Any],
        model_server: DeploymentHandle,
        gpu_pool: DeploymentHandle | None = None,
    ):
        """``settings_kwargs``: ``Settings.shared_kwargs()``; the admin token, the metadata store
        and MLflow URLs and the S3 keys come from this replica's environment (runtime_env
        env_vars the builder sets: ``Settings.credential_env("gateway")``)."""
        from app.api.app import ApiContext
        from app.auth import Authenticator
        from app.registry.mlflow_registry import ModelRegistry
        from app.settings import Settings
        from app.store import MetadataStore

        from actors.registry_cache import get_registry_cache

        settings = Settings.from_shared(settings_kwargs)
        store = MetadataStore.from_settings(settings)
        scheduler = _SchedulerControl(settings_kwargs, settings.actors.num_cpus, settings.credential_env("job_scheduler"))
        cache = get_registry_cache(settings_kwargs, settings.actors.num_cpus, settings.credential_env("registry_cache"))
        admin_token = settings.admin_token.get_secret_value() if settings.admin_token is not None else None
        resolver = _CachedResolver(cache, settings.serving.resolve_ttl_s)

        async def ray_ready() -> None:
            await asyncio.to_thread(ray.cluster_resources)

        gpus = _GpuControl(settings.actors.num_cpus)
        self.ctx = ApiContext(
            settings=settings,
            store=store,
            registry=ModelRegistry(settings, serving=True),
            authenticator=Authenticator(settings, store, admin_token),
            predictor=_ServePredictor(model_server, gpu_pool, grpc=settings.serving.handle_grpc),
            gpu_pool=gpu_pool is not None,
            jobs=scheduler,
            resolver=resolver,
            model_changed=resolver.changed,
            readiness={"ray": ray_ready, "job_scheduler": scheduler.ping, "registry_cache": _pinger(cache),
                       "gpu_manager": gpus.ping},
            cluster_resources=_cluster_resources,
            gpus=gpus,
            registry_offload=_registry_offload(settings_kwargs, settings.registry.convert_num_cpus),
        )

    def __serve_build_asgi_app__(self):
        from app.api.app import create_app

        return create_app(self.ctx)
