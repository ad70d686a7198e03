"""Bounded waits: every wait on the request path has a limit, and running past it is an error
of the hierarchy (``DependencyTimeout``: 503 with Retry-After), not a request that hangs."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from app.errors import DependencyTimeout

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], timeout_s: float, what: str, *, retry_after_s: int = 2) -> T:
    """``await awaitable`` for at most ``timeout_s`` seconds; past that it is cancelled and
    :class:`DependencyTimeout` names ``what`` (e.g. "the registry cache")."""
    import asyncio

    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise timed_out(what, timeout_s, retry_after_s=retry_after_s) from None


def timed_out(what: str, timeout_s: float, *, retry_after_s: int = 2) -> DependencyTimeout:
    """The error for a blocking wait (``ray.get(..., timeout=)``) that ran past ``timeout_s``."""
    return DependencyTimeout(
        f"{what} did not answer within {timeout_s:g} s; retry shortly",
        retry_after_s=retry_after_s,
        details={"timeout_s": timeout_s},
    )
