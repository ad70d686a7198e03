"""ModelServer: loads any registered version by id with ``@serve.multiplexed`` (LRU per
replica, Serve's own), so a new or changed endpoint never redeploys anything, and batches
concurrent small requests for the same model: with ``@serve.batch`` on the event loop for
cheap models, with a :class:`~app.serving.batching.CallQueue` in a worker thread for slow ones.

Two thread pools keep the event loop free: model I/O (loads, remote runtimes) and model calls
(slow models, requests over ``batch_max_rows``), so a burst of loads never holds up calls.

Batching is tuned at run time through ``user_config`` (see serve_config.yaml):
``{"batching": bool, "batch_max_requests": int, "batch_wait_s": float, "batch_max_rows": int}``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from deployments.model_host import ModelHost


def _get(ref, timeout_s: float, what: str):
    """``ray.get`` for at most ``timeout_s`` seconds (DependencyTimeout past it: 503)."""
    from app.waits import timed_out

    try:
        return ray.get(ref, timeout=max(timeout_s, 0.001))
    except ray.exceptions.GetTimeoutError:
        raise timed_out(what, timeout_s) from None


def _fetch_from_object_store(cache, model_id: str, timeout_s: float) -> Path:
    """Unpack the model that the RegistryCache keeps in the object store into a temp dir."""
    from app.registry.cache import unpack_to

    deadline = time.monotonic() + timeout_s
    [ref] = _get(cache.artifact.remote(model_id), timeout_s, f"the registry cache (artifact of {model_id})")
    data = _get(ref, deadline - time.monotonic(), f"the object store (artifact of {model_id})")
    return unpack_to(data, Path(tempfile.mkdtemp(prefix="matih-model-")))


@serve.deployment(name="ModelServer", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
class ModelServer(ModelHost):
    def __init__(self, settings_kwargs: dict[str, Any]):
        from actors.registry_cache import get_registry_cache
        from app.settings import Settings

        # No credentials here: models come from the RegistryCache, which the builder created.
        settings = Settings.from_shared(settings_kwargs)
        cache = get_registry_cache(settings_kwargs, settings.actors.num_cpus)
        # Serve's multiplexing owns this replica's LRU (it tells the router which models each
        # replica holds); wired at init time so its size comes from settings.
        lru = serve.multiplexed(max_num_models_per_replica=settings.serving.max_models_per_replica)
        async def load(model_id: str):  # a function: Serve marks it, which a bound method refuses
            return await self.load(model_id)

        gpu = serve.get_replica_context().deployment == "ModelServerGPU"
        super().__init__(settings, registry_cache_loader(settings, cache), get_model=lru(load),
                         where="model_server_gpu" if gpu else "model_server")

    async def predict(
        self, payload: dict[str, Any], config: dict[str, Any] | None = None, batch: bool = True
    ) -> dict[str, Any]:
        """The prediction for ``payload`` with the request's multiplexed model; or, when the
        request itself is wrong (bad payload, unknown model: an ``app.errors.CALLER_ERRORS``
        class), that error as the return value, which the Gateway raises. Serve logs every
        raised error as a replica failure with its traceback; a client's 4xx is not one.
        ``batch=False``: an ensemble member's call (ModelHost.predict_model)."""
        from app.errors import CALLER_ERRORS

        try:
            return await self.predict_model(serve.get_multiplexed_model_id(), payload, config, batch)
        except CALLER_ERRORS as exc:
            return exc

    async def signature(self) -> dict[str, Any]:
        runtime = await self.get_model(serve.get_multiplexed_model_id())
        sig = runtime.signature
        return {"n_features": sig.n_features, "feature_names": sig.feature_names, "task": sig.task}


def registry_cache_loader(settings, cache):
    """A ModelLoader that resolves, fetches and checks trust through the RegistryCache actor
    (which keeps each model packed in Ray's object store), every wait bounded."""
    from app.serving.loader import ModelLoader

    s = settings.serving
    return ModelLoader(
        settings,
        resolve=lambda model_id: _get(cache.resolve.remote(model_id), s.actor_timeout_s, "the registry cache"),
        fetch=lambda model: _fetch_from_object_store(cache, model.model_id, s.model_fetch_timeout_s),
        release=lambda path: shutil.rmtree(path, ignore_errors=True),
        trust=lambda name, version: _get(cache.trust.remote(name, version), s.actor_timeout_s, "the registry cache (trust)"),
    )
