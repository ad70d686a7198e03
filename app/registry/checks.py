"""Checks on the names a registry request carries: model names, versions, aliases, user tags.
Each returns the value in canonical form or raises ``InvalidInput`` naming the field."""

from __future__ import annotations

import re
from typing import Any

from app.errors import InvalidInput
from app.names import parse_version

_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInput(
            f"model name {name!r} must start with a letter or digit and hold only letters, digits, '_', '.', '-' "
            "(at most 128 characters)",
            details={"field": "name"},
        )
    return name


def check_version(version: str | int) -> str:
    return parse_version(version)


def check_alias(alias: str) -> str:
    if not _ALIAS_RE.match(alias or "") or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise InvalidInput(
            f"alias {alias!r} must start with a letter, hold letters, digits, '_' or '-' (at most 64), and not be "
            "'latest' or v<number> (MLflow reserves those)",
            details={"field": "alias"},
        )
    return alias


def check_user_tags(tags: dict[str, Any] | None) -> dict[str, str]:
    out = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key or key.startswith(("matih.", "mlflow.")):
            raise InvalidInput(
                f"tag {key!r} is reserved or empty: 'matih.' and 'mlflow.' tags are set by the platform; "
                "choose another key",
                details={"field": "tags"},
            )
        out[key] = str(value)
    return out
