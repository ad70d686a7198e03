"""The inference runtime interface and its registry of named implementations.

A runtime owns one loaded model: it loads it and runs it on a float32 matrix, nothing more.
Turning a request into that matrix is the codecs' work (``app/serving/payload.py``,
``app/serving/v2_codec.py``), checked against the :class:`ModelSignature` the runtime fills in
when it loads. New runtimes register a short name in ``RUNTIMES`` (name -> dotted path), as Feast does for
its stores, so configuration picks them by name.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from app.errors import InvalidInput
from app.serving.signature import ModelSignature


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
