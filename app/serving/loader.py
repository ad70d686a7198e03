"""Loading a registered version into a runtime: what a ModelServer replica does on a cache
miss, and what the in-process predictor does for tests and benchmarks."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from app import metrics
from app.errors import InvalidInput
from app.names import parse_version
from app.registry.formats import PICKLE_FORMATS
from app.registry.mlflow_registry import ModelRegistry, ResolvedModel, check_servable, model_metadata
from app.runtimes.base import ModelRuntime, get_runtime_class
from app.serving.endpoint_config import parse_endpoint_config
from app.serving.payload import prepare
from app.settings import Settings


def model_id_for(model: ResolvedModel, runtime: str = "onnx", config: dict[str, Any] | None = None) -> str:
    """The multiplexed model id: ``name/version`` for ONNX with its default options, else
    ``runtime:name/version[#config-hash]``, so one replica can hold the same version in two
    runtimes, and a changed runtime config opens a new runtime instead of reusing the old.
    Only the runtime's own config counts (not the endpoint's ``device`` or ``max_rows``); a
    config that is not valid for the runtime is an InvalidInput naming the field."""
    base = model.model_id if runtime == "onnx" else f"{runtime}:{model.model_id}"
    if config:
        key = parse_endpoint_config(runtime, config).runtime_key()
        if key:
            base = f"{base}#{key}"
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
        trust: Callable[[str, str], dict[str, Any] | None] | None = None,
    ):
        """``trust(name, version)`` is the metadata store's trust record of a pickle-based
        version (``MetadataStore.get_trust``, or the RegistryCache actor's copy of it); without
        it no pickle-based file is ever loaded."""
        self.settings = settings
        if resolve is None or fetch is None:
            # Only a loader that goes to MLflow itself opens a client: ModelRegistry sets MLflow's
            # timeouts and retries for the whole process, and a Gateway serving models in its own
            # process (through the RegistryCache) keeps its serving client's short ones.
            registry = registry or ModelRegistry(settings)
        self.registry = registry
        self._resolve = resolve or (lambda model_id: registry.resolve(model_id))
        self._fetch = fetch or registry.download
        self._release = release  # called once the runtime holds the model (temp copies)
        self._trust = trust

    def max_rows(self, config: dict[str, Any] | None) -> int:
        """Most rows in one request to an endpoint: its ``config.max_rows``, else the setting."""
        value = (config or {}).get("max_rows")
        return int(value) if value else self.settings.serving.max_batch_rows

    def load(self, model_id: str, config: dict[str, Any] | None = None) -> ModelRuntime:
        """Open ``[runtime:]name/version``; ``config`` is the endpoint's config."""
        began = time.perf_counter()
        runtime, name, version = parse_model_id(model_id)
        runtime_config = parse_endpoint_config(runtime, config).runtime
        resolved = self._with_trust(self._resolve(f"{name}/{version}"))
        check_servable(resolved)
        started = time.perf_counter()
        cls = get_runtime_class(runtime)
        model_dir = self._fetch(resolved) if cls.needs_artifact else None  # remote runtimes load nothing here
        fetched = time.perf_counter()
        rt = cls(runtime_config, self.settings)
        try:
            rt.load(model_dir, model_metadata(resolved))
        finally:
            if self._release is not None and model_dir is not None:
                self._release(model_dir)
        rt.warm_up()
        rt.signature.extra.update(
            {"fetch_seconds": fetched - started, "load_seconds": time.perf_counter() - fetched}
        )
        rt.model_name = name  # the ``model`` label of the batch metrics
        metrics.model_loaded(name, version, runtime, time.perf_counter() - began)
        return rt


    def fetch(self, model: ResolvedModel) -> Path:
        """The version's artifact directory (an ensemble's meta-learner is read from it)."""
        return self._fetch(model)

    def _with_trust(self, resolved: ResolvedModel) -> ResolvedModel:
        """The version with the digest from its trust record when it holds a pickle-based file;
        the runtime compares it with the file's bytes before unpickling (``load_native``)."""
        meta = model_metadata(resolved)
        if not PICKLE_FORMATS.intersection([meta["format"], *meta["formats"]]):
            return resolved
        record = self._trust(resolved.name, resolved.version) if self._trust is not None else None
        return dataclasses.replace(resolved, trusted_sha256=record["sha256"] if record else None)


class LocalPredictor:
    """Runs models in this process with an LRU of loaded runtimes. The same contract as the
    ModelServer deployment, without Ray: used by unit tests and the in-process benchmark."""

    def __init__(self, loader: ModelLoader, max_models: int = 8):
        self.loader = loader
        self.max_models = max_models
        self._models: LRUCache = LRUCache(maxsize=max_models)

    def get(self, model_id: str, config: dict[str, Any] | None = None) -> ModelRuntime:
        rt = self._models.get(model_id)
        if rt is None:
            rt = self.loader.load(model_id, config)
            self._models[model_id] = rt
        return rt

    async def predict(
        self, model: ResolvedModel, payload: dict[str, Any], runtime: str = "onnx", config: dict | None = None,
        *, batch: bool = True,
    ) -> dict[str, Any]:
        """``batch`` is the replicas' contract (an ensemble member's call says False); nothing is
        batched in this process."""
        rt = await asyncio.to_thread(self.get, model_id_for(model, runtime, config), config)
        matrix, probabilities = prepare(payload, rt.signature, self.loader.max_rows(config))
        if rt.blocking_io:
            return await asyncio.to_thread(rt.predict, matrix, probabilities=probabilities)
        return rt.predict(matrix, probabilities=probabilities)
