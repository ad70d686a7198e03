"""RegistryCache: the detached actor that resolves aliases for every replica, fans out
invalidations, serves the last known good answer while MLflow is down, and keeps model
artifacts in Ray's object store. A driver over ``app.registry.cache``."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray
from cachetools import LRUCache

from actors import get_or_create_actor

log = logging.getLogger(__name__)
ACTOR_NAME = "registry_cache"


@ray.remote
class RegistryCache:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.registry.cache import RegistryCacheCore
        from app.registry.mlflow_registry import ModelRegistry
        from app.settings import Settings
        from app.store import MetadataStore

        settings = Settings.from_shared(settings_kwargs)  # MLflow URL and S3 keys from its environment
        self._registry = ModelRegistry(settings, serving=True)
        self._store = MetadataStore.from_settings(settings)
        # Settle the registry mutations a crash left half done, off the actor's start (MLflow may be slow).
        threading.Thread(target=self._recover, args=(settings,), name="registry-recover", daemon=True).start()
        self._core = RegistryCacheCore(self._registry, settings.serving.resolve_ttl_s)
        self._artifacts: LRUCache = LRUCache(maxsize=settings.serving.object_store_models)
        self._pending: dict[str, asyncio.Future] = {}

    async def resolve(self, target: str):
        return await asyncio.to_thread(self._core.resolve, target)

    def _recover(self, settings) -> None:
        from app.registry.outbox import recover
        from app.registry.service import RegistryService

        try:
            recover(RegistryService(settings, self._registry, self._store),
                    older_than_s=settings.registry.outbox_recover_after_s)
        except Exception:  # the next start tries again; serving does not depend on it
            log.exception("registry outbox recovery failed")

    async def trust(self, name: str, version: str) -> dict[str, Any] | None:
        """The metadata store's trust record of a pickle-based version (read each time, never
        cached: a replica loads a pickle only with the digest recorded now)."""
        return await asyncio.to_thread(self._store.get_trust, name, version)

    async def invalidate(self, name: str) -> int:
        return self._core.invalidate(name)

    async def changes_since(self, epoch: int, timeout_s: float = 30.0):
        return await self._core.changes_since(epoch, timeout_s)

    async def health(self) -> dict[str, Any]:
        return {**self._core.health(), "epoch": self._core.epoch, "artifacts": list(self._artifacts)}

    async def artifact(self, model_id: str) -> list[ray.ObjectRef]:
        """The packed model directory of ``name/version`` in the object store, wrapped in a
        list so the caller gets the reference (owned here) rather than the bytes."""
        ref = self._artifacts.get(model_id)
        if ref is not None:
            return [ref]
        pending = self._pending.get(model_id)
        if pending is None:  # single flight: concurrent replicas share one download
            pending = asyncio.get_running_loop().create_future()
            self._pending[model_id] = pending
            try:
                ref = await self._put(model_id)
                pending.set_result(ref)
            except BaseException as exc:
                pending.set_exception(exc)
                raise
            finally:
                self._pending.pop(model_id, None)
            return [ref]
        return [await pending]

    async def _put(self, model_id: str) -> ray.ObjectRef:
        from app.registry.cache import pack_dir

        model = await asyncio.to_thread(self._core.resolve, model_id)
        tmp = Path(tempfile.mkdtemp(prefix="matih-artifact-"))
        try:
            path = await asyncio.to_thread(self._registry.download_to, model, tmp)
            data = await asyncio.to_thread(pack_dir, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        ref = ray.put(data)
        self._artifacts[model_id] = ref  # the least recently used one drops out (its object is freed)
        return ref


def get_registry_cache(settings_kwargs: dict[str, Any], num_cpus: float, env_vars: dict[str, str] | None = None):
    """The RegistryCache, created with ``settings_kwargs`` (``Settings.shared_kwargs()``) and
    ``env_vars`` (``Settings.credential_env("registry_cache")``) when it does not exist yet."""
    return get_or_create_actor(RegistryCache, ACTOR_NAME, settings_kwargs, num_cpus=num_cpus, env_vars=env_vars)
