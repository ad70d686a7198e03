"""StreamIngestor: the detached actor that consumes the push sources' declared streams (Kafka
topics, Redis stream keys) into Feast through the push API. A driver over
``app.features.streams.Ingestor``, whose loop runs in a thread of the actor; ``status()`` answers
from the actor's event loop meanwhile. Killed or restarted, it goes on from the committed
positions (at least once: docs/features.md)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import ray

from actors import NAMESPACE, get_or_create_actor

log = logging.getLogger(__name__)
ACTOR_NAME = "StreamIngestor"


@ray.remote
class StreamIngestor:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.settings import Settings

        self._settings = Settings.from_shared(settings_kwargs)  # database and Redis URLs from its environment
        self._core = None
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-ingestor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from app import metrics
        from app.features.streams import Ingestor

        while not self._stop.is_set():  # the registry may be down at start: retry until it opens
            try:
                self._core = Ingestor(self._settings, on_batch=metrics.feature_stream_batch)
                self._error = None
                break
            except Exception as exc:  # noqa: BLE001
                self._error = f"{type(exc).__name__}: {exc}"
                log.exception("stream ingestor: cannot open the feature store")
                self._stop.wait(5.0)
        if self._core is not None:
            self._core.run(self._stop)
            self._core.close()

    async def status(self) -> dict[str, Any]:
        """Each declared stream: rows, batches, dead letters, errors, lag, last event, freshness."""
        core = self._core
        if core is None:
            return {"streams": [], "error": self._error}
        return await asyncio.to_thread(core.status)

    async def ping(self) -> bool:
        return True


def get_stream_ingestor(settings_kwargs: dict[str, Any], num_cpus: float, env_vars: dict[str, str] | None = None):
    """The StreamIngestor, created with ``settings_kwargs`` (``Settings.shared_kwargs()``) and
    ``env_vars`` (the database and Redis URLs) when it does not exist yet."""
    return get_or_create_actor(StreamIngestor, ACTOR_NAME, settings_kwargs, num_cpus=num_cpus, env_vars=env_vars)


def find_stream_ingestor():
    """The running StreamIngestor of this cluster, or None."""
    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
