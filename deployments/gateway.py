"""Gateway: the FastAPI ingress. It builds an ApiContext whose services are Ray-backed
(the ModelServer handle, the JobScheduler actor) and serves ``app.api.app.create_app``."""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.errors import DependencyUnavailable, MatihError, Overloaded


class _ServePredictor:
    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def predict(self, model, payload: dict[str, Any]) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        try:
            return await self.handle.options(multiplexed_model_id=model.model_id).predict.remote(payload)
        except MatihError:
            raise  # raised in the replica: same class, same message (RayTaskError subclasses it)
        except BackPressureError:
            raise Overloaded("the model servers are at their request limit; retry shortly", retry_after_s=1) from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(getattr(exc, "cause", None), MatihError) else None
            if cause is not None:
                raise cause from None
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise DependencyUnavailable(f"model server unavailable: {exc}", retry_after_s=2) from None


class _SchedulerControl:
    def __init__(self, settings_kwargs: dict[str, Any], num_cpus: float):
        from actors.job_scheduler import get_job_scheduler

        self.actor = get_job_scheduler(settings_kwargs, num_cpus)

    async def notify(self) -> None:
        await self.actor.notify.remote()

    async def cancel(self, job_id: str, actor: str) -> dict[str, Any]:
        return await self.actor.cancel.remote(job_id, actor)

    async def ping(self) -> None:
        await self.actor.ping.remote()


@serve.deployment(name="Gateway", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress()
class Gateway:
    def __init__(self, settings_kwargs: dict[str, Any], model_server: DeploymentHandle, admin_token: str | None):
        from app.api.app import ApiContext
        from app.auth import Authenticator
        from app.registry.mlflow_registry import ModelRegistry
        from app.settings import Settings
        from app.store import MetadataStore

        settings = Settings(**settings_kwargs)
        store = MetadataStore(settings.database_url)
        scheduler = _SchedulerControl(settings_kwargs, settings.actors.num_cpus)

        async def ray_ready() -> None:
            await asyncio.to_thread(ray.cluster_resources)

        self.ctx = ApiContext(
            settings=settings,
            store=store,
            registry=ModelRegistry(settings),
            authenticator=Authenticator(settings, store, admin_token),
            predictor=_ServePredictor(model_server),
            jobs=scheduler,
            readiness={"ray": ray_ready, "job_scheduler": scheduler.ping},
        )

    def __serve_build_asgi_app__(self):
        from app.api.app import create_app

        return create_app(self.ctx)
