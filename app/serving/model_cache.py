"""An asyncio LRU of loaded models with one load per model at a time: what a Gateway replica
serving models in its own process uses where a ModelServer replica has Serve's multiplexing."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any


class ModelCache:
    """``await cache(model_id)``: the loaded model, from ``load(model_id)`` on a miss. Callers
    asking for a model that is loading wait for that one load (a failed load is not cached:
    the next caller tries again); past ``max_models`` the least recently used is dropped."""

    def __init__(self, load: Callable[[str], Awaitable[Any]], max_models: int):
        if max_models < 1:
            raise ValueError("max_models must be at least 1")
        self._load = load
        self.max_models = max_models
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models

    def __len__(self) -> int:
        return len(self._models)

    async def __call__(self, model_id: str) -> Any:
        model = self._models.get(model_id)
        if model is not None:
            self._models.move_to_end(model_id)
            return model
        pending = self._loading.get(model_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future = asyncio.get_running_loop().create_future()
        self._loading[model_id] = future
        try:
            model = await self._load(model_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._loading.pop(model_id, None)
        self._models[model_id] = model
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        future.set_result(model)
        return model
