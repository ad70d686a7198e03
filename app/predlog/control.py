"""The prediction log as the Gateway sees it: where a replica's buffer ships records, and the
control calls of the routes (stats, erasure, flush).

Two implementations of one small interface: :class:`ActorPredictionLog` over the PredictionLog
actor (the Gateway) and :class:`LocalPredictionLog` over an in-process
:class:`~app.predlog.service.PredictionLogService` (unit tests, tools). ``ship`` of either is
what :class:`~app.predlog.buffer.PredictionLogBuffer` takes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from app.predlog.buffer import Ship
from app.predlog.records import PredictionRecord
from app.waits import bounded


class PredictionLogControl(Protocol):
    async def write(self, records: list[PredictionRecord], dropped: dict[str, int]) -> Any:
        """Take a replica's shipment (records, and drops since its last shipment per endpoint)."""
        ...

    async def stats(self, endpoint: str) -> dict[str, Any]:
        """The log's counters and storage use for ``endpoint`` (PredictionLogService.stats)."""
        ...

    async def erase(
        self, endpoint: str, request_ids: list[str] | None = None, caller: str | None = None
    ) -> dict[str, int]:
        """Remove the records of ``request_ids`` or of ``caller`` (PredictionLogService.erase)."""
        ...

    async def flush(self) -> dict[str, int]:
        """Write every record received so far."""
        ...


class LocalPredictionLog:
    """The prediction log in this process; blocking work runs in a thread."""

    def __init__(self, service):
        self.service = service

    async def write(self, records: list[PredictionRecord], dropped: dict[str, int]) -> int:
        return self.service.write(records, dropped)  # an append under a short lock

    async def stats(self, endpoint: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.stats, endpoint)

    async def erase(
        self, endpoint: str, request_ids: list[str] | None = None, caller: str | None = None
    ) -> dict[str, int]:
        return await asyncio.to_thread(self.service.erase, endpoint, request_ids, caller)

    async def flush(self) -> dict[str, int]:
        return await asyncio.to_thread(self.service.flush)


class ActorPredictionLog:
    """The PredictionLog actor (``actors/prediction_log.py``); every call waits at most
    ``timeout_s`` (then DependencyTimeout, 503). Erasure rewrites files and may take longer:
    it waits ``erase_timeout_s``."""

    WHAT = "the prediction log"

    def __init__(self, actor, timeout_s: float = 10.0, erase_timeout_s: float = 120.0):
        self.actor = actor
        self.timeout_s = timeout_s
        self.erase_timeout_s = erase_timeout_s

    async def write(self, records: list[PredictionRecord], dropped: dict[str, int]) -> int:
        return await bounded(self.actor.write.remote(records, dropped), self.timeout_s, self.WHAT)

    async def stats(self, endpoint: str) -> dict[str, Any]:
        return await bounded(self.actor.stats.remote(endpoint), self.timeout_s, self.WHAT)

    async def erase(
        self, endpoint: str, request_ids: list[str] | None = None, caller: str | None = None
    ) -> dict[str, int]:
        return await bounded(self.actor.erase.remote(endpoint, request_ids, caller), self.erase_timeout_s, self.WHAT)

    async def flush(self) -> dict[str, int]:
        return await bounded(self.actor.flush.remote(), self.erase_timeout_s, self.WHAT)


def local_ship(service) -> Ship:
    """The buffer's ``ship`` into an in-process service."""
    return LocalPredictionLog(service).write


def actor_ship(actor, timeout_s: float = 10.0) -> Ship:
    """The buffer's ``ship`` to the PredictionLog actor."""
    return ActorPredictionLog(actor, timeout_s).write
