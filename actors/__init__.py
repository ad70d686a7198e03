"""Detached, named singleton actors (namespace ``matih``). Each is a thin driver over app/."""

from __future__ import annotations

from typing import Any

NAMESPACE = "matih"


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
