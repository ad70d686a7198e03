"""The RegistryCache's change feed across an actor restart: a subscriber never stays stale."""

from __future__ import annotations

import asyncio

from app.registry.cache import RegistryCacheCore
from app.registry.mlflow_registry import ModelRegistry
from app.settings import load_settings


def test_a_restarted_cache_tells_an_old_subscriber_to_drop_everything(tmp_path):
    registry = ModelRegistry(load_settings(matih_home=str(tmp_path)), serving=True)

    async def scenario():
        before = RegistryCacheCore(registry, ttl_s=60)
        for _ in range(5):
            before.invalidate("iris")
        held = before.epoch  # what a gateway replica knows when the actor dies
        await asyncio.sleep(0.002)
        after = RegistryCacheCore(registry, ttl_s=60)  # the restarted actor
        after.invalidate("iris")  # an alias moved right after the restart
        assert after.epoch > held
        epoch, names = await after.changes_since(held, timeout_s=0.01)
        assert (epoch, names) == (after.epoch, None)  # drop all: the move is not missed
        epoch, names = await after.changes_since(epoch, timeout_s=0.01)
        assert names == []
        after.invalidate("wine")
        assert (await after.changes_since(epoch, timeout_s=0.01))[1] == ["wine"]

    asyncio.run(scenario())
