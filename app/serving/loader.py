"""Loading a registered version into a runtime: what a ModelServer replica does on a cache
miss, and what the in-process predictor does for tests and benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from app.errors import InvalidInput
from app.registry.mlflow_registry import ModelRegistry, ResolvedModel, model_metadata
from app.runtimes.base import ModelRuntime, get_runtime_class
from app.settings import Settings


def parse_model_id(model_id: str) -> tuple[str, str]:
    name, sep, version = model_id.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise InvalidInput(f"model id {model_id!r} is not 'name/version'")
    return name, version


class ModelLoader:
    def __init__(self, settings: Settings, registry: ModelRegistry | None = None):
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)

    def runtime_options(self) -> dict[str, Any]:
        return {
            "intra_op_threads": self.settings.serving.onnx_intra_op_threads,
            "inter_op_threads": self.settings.serving.onnx_inter_op_threads,
            "max_rows": self.settings.serving.max_batch_rows,
        }

    def load(self, model_id: str, runtime: str = "onnx") -> ModelRuntime:
        name, version = parse_model_id(model_id)
        resolved = self.registry.resolve(f"{name}/{version}")
        model_dir = self.registry.download(resolved)
        rt = get_runtime_class(runtime)(self.runtime_options())
        started = time.perf_counter()
        rt.load(model_dir, model_metadata(resolved))
        rt.warm_up()
        rt.signature.extra["load_seconds"] = time.perf_counter() - started
        return rt


class LocalPredictor:
    """Runs models in this process with an LRU of loaded runtimes. The same contract as the
    ModelServer deployment, without Ray: used by unit tests and the in-process benchmark."""

    def __init__(self, loader: ModelLoader, max_models: int = 8):
        self.loader = loader
        self.max_models = max_models
        self._models: OrderedDict[str, ModelRuntime] = OrderedDict()

    def get(self, model_id: str) -> ModelRuntime:
        rt = self._models.get(model_id)
        if rt is None:
            rt = self.loader.load(model_id)
            self._models[model_id] = rt
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(model_id)
        return rt

    async def predict(self, model: ResolvedModel, payload: dict[str, Any]) -> dict[str, Any]:
        rt = await asyncio.to_thread(self.get, model.model_id)
        return rt.infer(payload)
