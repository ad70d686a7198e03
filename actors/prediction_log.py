"""PredictionLog: the detached actor every Gateway replica ships its prediction records to.
A driver over ``app.predlog.service.PredictionLogService``: it writes what it received every
``predlog.write_interval_s``, compacts small files every ``compact_interval_s`` and deletes
partitions past their endpoint's retention every ``retention_interval_s``.

Its counters live as long as the actor; records received but not written yet are lost when
the actor dies (at most ``write_interval_s`` of them; the files are the durable state)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors import get_or_create_actor
from app.errors import MatihError

log = logging.getLogger(__name__)
ACTOR_NAME = "prediction_log"


@ray.remote
class PredictionLog:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.predlog.service import PredictionLogService
        from app.settings import Settings
        from app.store import MetadataStore

        settings = Settings.from_shared(settings_kwargs)  # database URL and S3 keys from its environment
        self._settings = settings
        self._service = PredictionLogService(settings)
        self._store = MetadataStore.from_settings(settings)
        s = settings.predlog
        loop = asyncio.get_event_loop()
        self._tasks = [
            loop.create_task(self._every(s.write_interval_s, self._service.flush, "writing")),
            loop.create_task(self._every(s.compact_interval_s, self._service.compact, "compaction")),
            loop.create_task(self._every(s.retention_interval_s, self._retention, "retention")),
        ]

    async def _every(self, interval_s: float, fn, what: str) -> None:
        """``fn`` in a thread every ``interval_s``, so that write() calls never wait behind it."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(fn)
            except MatihError as exc:  # storage or store briefly down: the next round tries again
                log.warning("prediction log %s failed: %s", what, exc.message)
            except Exception:
                log.exception("prediction log %s failed", what)

    def _retention(self) -> dict[str, int]:
        from app.predlog.service import retention_days

        default = self._settings.predlog.retention_days
        return self._service.enforce_retention(retention_days(self._store, default), default)

    async def write(self, records: list, dropped: dict[str, int] | None = None) -> int:
        """A replica's shipment; answered at once (the records are written on the timer)."""
        return self._service.write(records, dropped or {})

    async def flush(self) -> dict[str, int]:
        return await asyncio.to_thread(self._service.flush)

    async def stats(self, endpoint: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._service.stats, endpoint)

    async def erase(
        self, endpoint: str, request_ids: list[str] | None = None, caller: str | None = None
    ) -> dict[str, int]:
        return await asyncio.to_thread(self._service.erase, endpoint, request_ids, caller)

    async def compact(self, endpoint: str | None = None) -> dict[str, int]:
        return await asyncio.to_thread(self._service.compact, endpoint)

    async def enforce_retention(self) -> dict[str, int]:
        return await asyncio.to_thread(self._retention)

    async def ping(self) -> bool:
        return True


def get_prediction_log(settings_kwargs: dict[str, Any], settings) -> Any:
    """The PredictionLog actor, created with ``settings_kwargs`` (``Settings.shared_kwargs()``),
    ``settings.predlog.actor_num_cpus`` and the credentials of ``credential_env("prediction_log")``
    when it does not exist yet."""
    return get_or_create_actor(
        PredictionLog, ACTOR_NAME, settings_kwargs, num_cpus=settings.predlog.actor_num_cpus,
        env_vars=settings.credential_env("prediction_log"),
    )
