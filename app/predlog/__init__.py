"""The prediction log: every prediction through an endpoint, buffered per Gateway replica,
written as parquet partitioned by endpoint and hour, joined with the feedback that arrives
later. ``app.predlog.read(endpoint, since, until)`` is the Ray Data reader."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray.data

    from app.settings import Settings


def read(endpoint: str, since: datetime, until: datetime, *, settings: Settings | None = None) -> ray.data.Dataset:
    """``endpoint``'s logged predictions with ``since <= timestamp < until`` as a Ray Data
    dataset (see :func:`app.predlog.query.read`); ``settings`` default to ``load_settings()``."""
    from app.predlog.query import read as _read

    return _read(endpoint, since, until, settings=settings)
