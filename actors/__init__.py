"""Detached, named singleton actors (namespace ``matih``). Each is a thin driver over app/."""

from __future__ import annotations

import logging
from typing import Any

NAMESPACE = "matih"
log = logging.getLogger(__name__)


def get_or_create_actor(
    actor_cls, name: str, *args: Any, num_cpus: float = 0.05, env_vars: dict[str, str] | None = None, **options: Any
):
    """Return the named singleton, creating it on first use.

    Singletons are detached (they outlive the process that made them), restart forever, and
    are found again by name: as Ray Serve creates its own controller. ``env_vars`` (the
    credentials it reads from its environment) apply only when this call creates it.
    """
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    return actor_cls.options(
        name=name,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=num_cpus,
        **options,
    ).remote(*args)


def announce(key: str) -> None:
    """Push ``key`` (``endpoint:<name>`` or a model name) to every Gateway replica through the
    RegistryCache's change feed; not awaited. Without a RegistryCache (yet) the replicas'
    caches expire on their own."""
    import ray

    from actors.registry_cache import ACTOR_NAME as CACHE

    try:
        ray.get_actor(CACHE, namespace=NAMESPACE).invalidate.remote(key)
    except ValueError:
        log.warning("no registry cache to announce %s to", key)
