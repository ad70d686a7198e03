"""What a loaded model takes and gives: the contract between the request codecs
(``payload.py``, ``v2_codec.py``), which check requests against it, and the runtimes
(``app/runtimes/``), which fill it in when they load a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelSignature:
    """What a loaded model takes and gives, as the runtime found it."""

    n_features: int | None
    feature_names: list[str] | None = None
    task: str | None = None  # "classification" | "regression"
    classes: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
