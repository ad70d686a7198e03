"""EventRelay: the detached actor that publishes the outbox of platform events to the sink
(``events.sink``). A driver over ``app.events.relay.EventRelay``: a loop of rounds every
``events.relay_interval_s``, sooner when ``notify()`` says events were written, later while the
sink is down (the core's backoff). After a restart it simply goes on from the outbox: whatever
was not marked published is sent again (at least once)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors import NAMESPACE, get_or_create_actor

log = logging.getLogger(__name__)
ACTOR_NAME = "event_relay"
_IDLE_INTERVAL_S = 30.0


@ray.remote
class EventRelay:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.events.relay import EventRelay as RelayCore
        from app.settings import Settings
        from app.store import MetadataStore

        settings = Settings.from_shared(settings_kwargs)  # database and Redis URLs from its environment
        self._interval = settings.events.relay_interval_s
        self._store = MetadataStore.from_settings(settings)
        self._core = RelayCore(settings, self._store)
        self._wake = asyncio.Event()
        self._loop_task = asyncio.get_event_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            published = 0
            try:
                published = await asyncio.to_thread(self._core.run_once)
            except Exception:  # the store may be briefly down; the outbox is still there next round
                log.exception("event relay round failed")
            if published >= self._core.settings.events.relay_batch:
                continue  # more are waiting: no pause between full batches
            # With the none sink a round only reports the depth and purges: no need to poll often.
            interval = self._interval if self._core.publishing else max(self._interval, _IDLE_INTERVAL_S)
            wait = max(interval, self._core.seconds_until_due())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def notify(self) -> None:
        """Events were written: look at the outbox now rather than at the next round (a sink
        that is down keeps its backoff: the round then only reports the depth)."""
        self._wake.set()

    async def status(self) -> dict[str, Any]:
        """The sink, the outbox depth, the last error and the last event published."""
        return await asyncio.to_thread(self._core.status)

    async def ping(self) -> bool:
        return True


def get_event_relay(settings_kwargs: dict[str, Any], num_cpus: float, env_vars: dict[str, str] | None = None):
    """The EventRelay, created with ``settings_kwargs`` (``Settings.shared_kwargs()``) and
    ``env_vars`` (``Settings.credential_env("event_relay")``) when it does not exist yet."""
    return get_or_create_actor(EventRelay, ACTOR_NAME, settings_kwargs, num_cpus=num_cpus, env_vars=env_vars)


def find_event_relay():
    """The running EventRelay of this cluster, or None."""
    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
