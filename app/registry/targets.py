"""Endpoint targets: ``name@alias``, ``name/version``, and MLflow's ``models:/`` forms."""

from __future__ import annotations

import re
from dataclasses import dataclass

from app.errors import InvalidInput
from app.names import VERSION_PATTERN

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
_ALIAS_RE = re.compile(rf"^(?:models:/)?(?P<name>{_NAME})@(?P<alias>[A-Za-z][A-Za-z0-9_-]{{0,63}})$")
_VERSION_RE = re.compile(rf"^(?:models:/)?(?P<name>{_NAME})/(?P<version>{VERSION_PATTERN})$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed target: exactly one of ``alias`` and ``version`` is set."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_target(target: str) -> ModelRef:
    m = _ALIAS_RE.fullmatch(target)
    if m:
        return ModelRef(m["name"], alias=m["alias"])
    m = _VERSION_RE.fullmatch(target)
    if m:
        return ModelRef(m["name"], version=m["version"])
    raise InvalidInput(
        f"target {target!r} is not a model reference; use 'name@alias' (e.g. iris@champion), "
        "'name/version' (e.g. iris/3) or models:/ forms of either",
        details={"field": "target"},
    )


def model_name_of(key: str) -> str:
    """The model name in a resolution key: 'iris@champion' and 'iris/3' -> 'iris'
    (model names never hold '@' or '/')."""
    return key.split("@", 1)[0] if "@" in key else key.rsplit("/", 1)[0]
