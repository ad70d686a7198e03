"""Names of things users create (models, endpoints, jobs): one rule everywhere."""

from __future__ import annotations

import re

from app.errors import InvalidInput

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)


def check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} {value!r} must start with a letter or digit and hold only letters, digits, '_', '.', '-' "
            "(at most 128 characters)"
        )
    return value


# One spelling per version: MLflow numbers versions 1, 2, 3...; the ASCII class [0-9] (not \d,
# which takes "²" and "٣") and fullmatch (not $, which takes a trailing newline).
VERSION_PATTERN = r"[1-9][0-9]{0,8}"
_VERSION_RE = re.compile(VERSION_PATTERN)


def parse_version(value: str | int, field: str = "version") -> str:
    """A model version as MLflow numbers them, in its one canonical spelling: a positive decimal
    integer of at most 9 ASCII digits, without sign, spaces or leading zeros. "3" and 3 pass;
    "03", "+3", " 3", "3\\n", "0", "³" and "٣" are refused with ``InvalidInput`` naming ``field``,
    on every route that takes ``{version}`` and every body that names versions."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise InvalidInput(
            f"{field} {shown} is not a model version: use its number as MLflow shows it (1, 2, 3...; "
            "ASCII digits, no sign, spaces or leading zeros)",
            details={"field": field},
        )
    return text
