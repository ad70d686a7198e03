"""The registry cache: alias resolution with a TTL, invalidation fanned out to every
subscriber, the last known good answer while MLflow is down, and model artifacts packed
once so that any number of replicas load them without going back to MLflow.

Plain Python; ``actors/registry_cache.py`` runs one instance as a detached actor and keeps
the packed artifacts in Ray's object store.
"""

from __future__ import annotations

import asyncio
import io
import logging
import tarfile
import time
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from app.errors import DependencyUnavailable
from app.registry.mlflow_registry import ModelRegistry, ResolvedModel
from app.registry.targets import ModelRef, model_name_of, parse_target

log = logging.getLogger(__name__)


class RegistryCacheCore:
    def __init__(self, registry: ModelRegistry, ttl_s: float, max_entries: int = 4096):
        self.registry = registry
        self.ttl_s = ttl_s
        # Resolutions are fresh for ttl_s; a stale one stays as the last known good answer while
        # MLflow is down, which cachetools' TTLCache (it drops expired entries) cannot keep, so the
        # freshness is an LRU of (fresh until, model) and the expiry check is ours.
        self._entries: LRUCache = LRUCache(maxsize=max_entries)
        # Epochs start at the clock (µs), not 0: a restarted actor's epochs are then past any
        # epoch a subscriber holds from before, which it answers with "drop all" instead of
        # waiting until its own count climbs back to that number.
        self.epoch = time.time_ns() // 1_000
        self._changed = asyncio.Event()
        self._recent: list[tuple[int, str]] = []
        self.mlflow_error: str | None = None
        self.mlflow_error_since: float | None = None

    # -- resolution ------------------------------------------------------------------------
    def resolve(self, target: str | ModelRef) -> ResolvedModel:
        ref = parse_target(target) if isinstance(target, str) else target
        key = str(ref)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        try:
            model = self.registry.resolve(ref, use_cache=False)
        except DependencyUnavailable as exc:
            self._mark_down(exc.message)
            if entry is not None:  # serve on with the last known good answer
                return entry[1]
            raise
        self._mark_up()
        self._entries[key] = (now + self.ttl_s, model)
        return model

    def _mark_down(self, message: str) -> None:
        if self.mlflow_error is None:
            log.warning("MLflow unavailable; serving last known good resolutions: %s", message)
            self.mlflow_error_since = time.time()
        self.mlflow_error = message

    def _mark_up(self) -> None:
        self.mlflow_error = None
        self.mlflow_error_since = None

    def health(self) -> dict[str, Any]:
        return {"mlflow_up": self.mlflow_error is None, "error": self.mlflow_error, "since": self.mlflow_error_since}

    # -- invalidation ----------------------------------------------------------------------
    def invalidate(self, name: str) -> int:
        """Drop every cached resolution of ``name`` and tell subscribers. Returns the new epoch."""
        for key in [k for k in list(self._entries.keys()) if model_name_of(k) == name]:
            self._entries.pop(key, None)
        self.registry.invalidate(name)
        self.epoch += 1
        self._recent.append((self.epoch, name))
        del self._recent[:-1000]
        self._changed.set()
        self._changed = asyncio.Event()
        return self.epoch

    async def changes_since(self, epoch: int, timeout_s: float) -> tuple[int, list[str] | None]:
        """Long poll: wait until the epoch passes ``epoch`` (or the timeout), then return the new
        epoch and the model names changed since; ``None`` means "too far behind, drop all"."""
        if epoch == self.epoch:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        if epoch == self.epoch:
            return self.epoch, []
        if not self._recent or self._recent[0][0] > epoch + 1 or epoch > self.epoch:
            return self.epoch, None
        return self.epoch, sorted({name for e, name in self._recent if e > epoch})


def pack_dir(path: Path) -> bytes:
    """A model directory as one uncompressed tar (models are mostly incompressible)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for item in sorted(Path(path).rglob("*")):
            if item.is_file() and not item.is_symlink():
                tar.add(item, arcname=str(item.relative_to(path)), recursive=False)
    return buf.getvalue()


def unpack_to(data: bytes, dest: Path) -> Path:
    """Unpack a :func:`pack_dir` archive into ``dest``; refuses members outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")
    return dest
