"""RolloutController: the detached actor that moves canary rollouts on. A driver over
``app.rollouts.controller.RolloutController``: a loop that calls ``tick()`` every
``rollouts.tick_s``. The rollouts' state lives in the metadata store, so a restarted actor (or
one killed mid-step) goes on from the stored step; endpoint and alias changes are announced
through the RegistryCache's change feed, as the API announces them, so every Gateway replica
sees the new traffic plan at once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors import NAMESPACE, announce, get_or_create_actor

log = logging.getLogger(__name__)
ACTOR_NAME = "rollout_controller"


@ray.remote
class RolloutController:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.registry.mlflow_registry import ModelRegistry
        from app.registry.service import RegistryService
        from app.rollouts.controller import RolloutController as Core
        from app.settings import Settings
        from app.store import MetadataStore

        settings = Settings.from_shared(settings_kwargs)  # database, MLflow and S3 credentials from its environment
        store = MetadataStore.from_settings(settings)
        registry = RegistryService(settings, ModelRegistry(settings), store)
        self._interval = settings.rollouts.tick_s
        self._core = Core(store, settings, registry, notify=announce)
        self._rounds = 0
        self._last_error: str | None = None
        self._loop_task = asyncio.get_event_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._core.tick)
                self._last_error = None
            except Exception as exc:  # the store may be briefly down; the rollouts are still there next round
                self._last_error = repr(exc)
                log.exception("rollout controller round failed")
            self._rounds += 1
            await asyncio.sleep(self._interval)

    async def tick(self) -> list[dict[str, Any]]:
        """One round now (tests, and the API after a change it wants judged at once)."""
        return await asyncio.to_thread(self._core.tick)

    async def status(self) -> dict[str, Any]:
        return {"rounds": self._rounds, "tick_s": self._interval, "last_error": self._last_error}

    async def ping(self) -> bool:
        return True


def get_rollout_controller(settings_kwargs: dict[str, Any], num_cpus: float, env_vars: dict[str, str] | None = None):
    """The RolloutController, created with ``settings_kwargs`` (``Settings.shared_kwargs()``) and
    ``env_vars`` (``Settings.credential_env("rollout_controller")``) when it does not exist yet."""
    return get_or_create_actor(RolloutController, ACTOR_NAME, settings_kwargs, num_cpus=num_cpus, env_vars=env_vars)


def find_rollout_controller():
    """The running RolloutController of this cluster, or None."""
    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
