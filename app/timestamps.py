"""Event times sent by clients: ISO 8601 or epoch seconds, always returned in UTC. One parser
for every place a request carries a time of its own (feedback rows, pushed feature rows)."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

MAX_EPOCH_S = 253402300799  # 9999-12-31T23:59:59Z


def parse_timestamp(value: Any, *, numeric_strings: bool = False) -> datetime:
    """``value`` as an aware UTC datetime: a datetime (naive = UTC), epoch seconds (0 to
    :data:`MAX_EPOCH_S`), or an ISO 8601 string (no offset = UTC); with ``numeric_strings``, a
    string of epoch seconds too. ValueError otherwise."""
    if isinstance(value, datetime):
        ts = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return _epoch(value)
    elif isinstance(value, str):
        if numeric_strings:
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _epoch(number)
        try:
            ts = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{value[:64]!r} is neither ISO 8601 (2026-12-03T07:00:00Z) nor epoch seconds"
            ) from None
    else:
        raise ValueError("must be an ISO 8601 string or epoch seconds")
    ts = ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts
    try:
        return ts.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise ValueError(f"{value!r} is out of range") from None


def _epoch(value: float) -> datetime:
    if not math.isfinite(value) or not 0 <= value <= MAX_EPOCH_S:
        raise ValueError(f"epoch seconds {value!r} must be between 0 and {MAX_EPOCH_S}")
    return datetime.fromtimestamp(value, tz=timezone.utc)
