"""The inference runtime interface and its registry of named implementations.

A runtime owns one loaded model. The base class owns the pipeline
(``validate -> predict -> postprocess``); implementations fill in ``load`` and ``predict``.
New runtimes register a short name in ``RUNTIMES`` (name -> dotted path), as Feast does for
its stores, so configuration picks them by name.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from app.errors import InvalidInput


@dataclass
class ModelSignature:
    """What a loaded model takes and gives, as the runtime found it."""

    n_features: int | None
    feature_names: list[str] | None = None
    task: str | None = None  # "classification" | "regression"
    classes: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelRuntime(ABC):
    name: ClassVar[str]
    # False for runtimes that serve from elsewhere (a remote Triton server): the loader then
    # skips fetching the MLflow artifacts and ``load`` gets ``model_dir=None``.
    needs_artifact: ClassVar[bool] = True
    # True when ``predict`` waits on the network: the ModelServer runs it off its event loop.
    blocking_io: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = options or {}
        self.signature: ModelSignature | None = None
        self.ready = False
        self.warm_call_s: float | None = None  # one 1-row call, timed by warm_up()

    @abstractmethod
    def load(self, model_dir: Path, metadata: dict[str, Any]) -> None:
        """Load the model from an MLflow model directory; set ``signature`` and ``ready``."""

    @abstractmethod
    def predict(self, features: np.ndarray, *, probabilities: bool = False) -> dict[str, Any]:
        """Predict for a float32 matrix of shape (rows, n_features).

        Returns ``{"predictions": [...]}`` and, when asked and available, ``"probabilities"``.
        """

    def warm_up(self) -> None:
        """Run one prediction so the first real request does not pay for lazy initialisation,
        then time a second one into ``warm_call_s``: a server knows what a call of this model
        costs before its first request (the ModelServer picks its batching path by it)."""
        if self.signature and self.signature.n_features:
            row = np.zeros((1, self.signature.n_features), dtype=np.float32)
            self.predict(row)
            started = time.perf_counter()
            self.predict(row)
            self.warm_call_s = time.perf_counter() - started

    def prepare(self, payload: dict[str, Any]) -> tuple[np.ndarray, bool]:
        """Validate a payload against the signature: (float32 matrix, want probabilities)."""
        from app.serving.payload import payload_to_matrix

        assert self.signature is not None, "load() first"
        matrix = payload_to_matrix(payload, self.signature, max_rows=int(self.options.get("max_rows", 100_000)))
        return matrix, bool(payload.get("return_probabilities"))

    def infer(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The pipeline: payload -> validated matrix -> predict."""
        matrix, probabilities = self.prepare(payload)
        return self.predict(matrix, probabilities=probabilities)


RUNTIMES: dict[str, str] = {
    "onnx": "app.runtimes.onnx.OnnxModelRuntime",
    "native": "app.runtimes.native.NativeModelRuntime",
    "triton": "app.runtimes.triton.TritonModelRuntime",
}


def get_runtime_class(name: str) -> type[ModelRuntime]:
    try:
        path = RUNTIMES[name]
    except KeyError:
        raise InvalidInput(
            f"runtime {name!r} is unknown; available: {', '.join(sorted(RUNTIMES))}", details={"field": "runtime"}
        ) from None
    module, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(module), cls)
