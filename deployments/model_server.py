"""ModelServer: loads any registered version by id with ``@serve.multiplexed`` (LRU per
replica), so a new or changed endpoint never redeploys anything."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve


@serve.deployment(name="ModelServer", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class ModelServer:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.serving.loader import ModelLoader
        from app.settings import Settings

        self.settings = Settings(**settings_kwargs)
        self.loader = ModelLoader(self.settings)
        loader = self.loader

        async def load(model_id: str):
            return await asyncio.to_thread(loader.load, model_id)

        # Wired at init time so the LRU size comes from settings (Serve detects it on the instance).
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.settings.serving.max_models_per_replica)(
            load
        )

    async def predict(self, payload: dict[str, Any]) -> dict[str, Any]:
        runtime = await self.get_model(serve.get_multiplexed_model_id())
        return runtime.infer(payload)

    async def signature(self) -> dict[str, Any]:
        runtime = await self.get_model(serve.get_multiplexed_model_id())
        sig = runtime.signature
        return {"n_features": sig.n_features, "feature_names": sig.feature_names, "task": sig.task}
