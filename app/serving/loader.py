"""Loading a registered version into a runtime: what a ModelServer replica does on a cache
miss, and what the in-process predictor does for tests and benchmarks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.errors import InvalidInput
from app.names import parse_version
from app.registry.mlflow_registry import ModelRegistry, ResolvedModel, check_servable, model_metadata
from app.runtimes.base import ModelRuntime, get_runtime_class
from app.settings import Settings


def model_id_for(model: ResolvedModel, runtime: str = "onnx", config: dict[str, Any] | None = None) -> str:
    """The multiplexed model id: ``name/version`` for ONNX with no config, else
    ``runtime:name/version[#config-hash]``, so one replica can hold the same version in two
    runtimes, and a changed endpoint config opens a new runtime instead of reusing the old."""
    base = model.model_id if runtime == "onnx" else f"{runtime}:{model.model_id}"
    if config:
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
        base = f"{base}#{digest}"
    return base


def parse_model_id(model_id: str) -> tuple[str, str, str]:
    """``[runtime:]name/version[#hash]`` -> (runtime, name, version)."""
    model_id = model_id.split("#", 1)[0]
    runtime, sep, rest = model_id.partition(":")
    if not sep:
        runtime, rest = "onnx", model_id
    name, sep, version = rest.rpartition("/")
    if not sep or not name:
        raise InvalidInput(f"model id {model_id!r} is not '[runtime:]name/version'")
    return runtime, name, parse_version(version)


class ModelLoader:
    """Resolves ``name/version``, fetches its artifacts to a local directory and opens a runtime.

    ``resolve`` and ``fetch`` are pluggable: by default straight from MLflow (tests, the
    in-process predictor); in a ModelServer replica through the RegistryCache actor, which
    keeps each model packed in Ray's object store so replicas never re-download it.
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry | None = None,
        *,
        resolve: Callable[[str], ResolvedModel] | None = None,
        fetch: Callable[[ResolvedModel], Path] | None = None,
        release: Callable[[Path], None] | None = None,
    ):
        self.settings = settings
        self.registry = registry or ModelRegistry(settings)
        self._resolve = resolve or (lambda model_id: self.registry.resolve(model_id))
        self._fetch = fetch or self.registry.download
        self._release = release  # called once the runtime holds the model (temp copies)

    def runtime_options(self) -> dict[str, Any]:
        return {
            "intra_op_threads": self.settings.serving.onnx_intra_op_threads,
            "inter_op_threads": self.settings.serving.onnx_inter_op_threads,
            "max_rows": self.settings.serving.max_batch_rows,
        }

    def load(self, model_id: str, config: dict[str, Any] | None = None) -> ModelRuntime:
        """Open ``[runtime:]name/version``; ``config`` is the endpoint's runtime config."""
        runtime, name, version = parse_model_id(model_id)
        resolved = self._resolve(f"{name}/{version}")
        check_servable(resolved)
        started = time.perf_counter()
        cls = get_runtime_class(runtime)
        model_dir = self._fetch(resolved) if cls.needs_artifact else None  # remote runtimes load nothing here
        fetched = time.perf_counter()
        rt = cls({**self.runtime_options(), **(config or {})})
        try:
            rt.load(model_dir, model_metadata(resolved))
        finally:
            if self._release is not None and model_dir is not None:
                self._release(model_dir)
        rt.warm_up()
        rt.signature.extra.update(
            {"fetch_seconds": fetched - started, "load_seconds": time.perf_counter() - fetched}
        )
        return rt


class LocalPredictor:
    """Runs models in this process with an LRU of loaded runtimes. The same contract as the
    ModelServer deployment, without Ray: used by unit tests and the in-process benchmark."""

    def __init__(self, loader: ModelLoader, max_models: int = 8):
        self.loader = loader
        self.max_models = max_models
        self._models: OrderedDict[str, ModelRuntime] = OrderedDict()

    def get(self, model_id: str, config: dict[str, Any] | None = None) -> ModelRuntime:
        rt = self._models.get(model_id)
        if rt is None:
            rt = self.loader.load(model_id, config)
            self._models[model_id] = rt
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(model_id)
        return rt

    async def predict(
        self, model: ResolvedModel, payload: dict[str, Any], runtime: str = "onnx", config: dict | None = None
    ) -> dict[str, Any]:
        rt = await asyncio.to_thread(self.get, model_id_for(model, runtime, config), config)
        if rt.blocking_io:
            return await asyncio.to_thread(rt.infer, payload)
        return rt.infer(payload)
