"""Request ids the server issues: 32 hex digits, time-ordered (the first 12 are the Unix time
in milliseconds, as in UUIDv7; the rest random), so that an id alone says which hour partition
of the prediction log holds its records and ids sort by time."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone

_ID_RE = re.compile(r"[0-9a-f]{32}")


def new_request_id(now_s: float | None = None) -> str:
    ms = int((time.time() if now_s is None else now_s) * 1000)
    return f"{ms:012x}{os.urandom(10).hex()}"


def is_request_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def request_id_time(request_id: str) -> datetime | None:
    """When the server issued ``request_id``; None for a string that is not one of its ids."""
    if not is_request_id(request_id):
        return None
    try:
        return datetime.fromtimestamp(int(request_id[:12], 16) / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
