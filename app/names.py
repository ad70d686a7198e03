"""Names of things users create (models, endpoints, jobs): one rule everywhere."""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and hold only letters, digits, '_', '.', '-' "
            "(at most 128 characters)"
        )
    return value
