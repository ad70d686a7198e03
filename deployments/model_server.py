"""ModelServer: loads any registered version by id with ``@serve.multiplexed`` (LRU per
replica), so a new or changed endpoint never redeploys anything."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import serve


def _fetch_from_object_store(cache, model_id: str) -> Path:
    """Unpack the model that the RegistryCache keeps in the object store into a temp dir."""
    from app.registry.cache import unpack_to

    [ref] = ray.get(cache.artifact.remote(model_id))
    return unpack_to(ray.get(ref), Path(tempfile.mkdtemp(prefix="matih-model-")))


@serve.deployment(name="ModelServer", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class ModelServer:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from actors.registry_cache import get_registry_cache
        from app.serving.loader import ModelLoader
        from app.settings import Settings

        self.settings = Settings(**settings_kwargs)
        cache = get_registry_cache(settings_kwargs, self.settings.actors.num_cpus)
        self.loader = ModelLoader(
            self.settings,
            resolve=lambda model_id: ray.get(cache.resolve.remote(model_id)),
            fetch=lambda model: _fetch_from_object_store(cache, model.model_id),
            release=lambda path: shutil.rmtree(path, ignore_errors=True),
        )
        loader = self.loader

        configs = self._configs = {}  # model id -> the endpoint runtime config it was asked with

        async def load(model_id: str):
            return await asyncio.to_thread(loader.load, model_id, configs.get(model_id))

        # Wired at init time so the LRU size comes from settings (Serve detects it on the instance).
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.settings.serving.max_models_per_replica)(
            load
        )

    async def predict(self, payload: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()
        if config:
            self._configs[model_id] = config
        runtime = await self.get_model(model_id)
        return runtime.infer(payload)

    async def signature(self) -> dict[str, Any]:
        runtime = await self.get_model(serve.get_multiplexed_model_id())
        sig = runtime.signature
        return {"n_features": sig.n_features, "feature_names": sig.feature_names, "task": sig.task}
