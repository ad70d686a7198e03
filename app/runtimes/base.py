"""The inference runtime interface and its registry of named implementations.

A runtime owns one loaded model: it loads it and runs it on a float32 matrix, nothing more.
Turning a request into that matrix is the codecs' work (``app/serving/payload.py``,
``app/serving/v2_codec.py``), checked against the :class:`ModelSignature` the runtime fills in
when it loads. New runtimes register a short name in ``RUNTIMES`` (name -> dotted path), as
Feast does for its stores, so configuration picks them by name.

Each runtime declares its options as a typed :class:`RuntimeConfig` (``Config``): an endpoint's
config is checked against it when the endpoint is created or changed, and only that config
goes into the multiplexed model id (``app/serving/endpoint_config.py``).
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from app.errors import InvalidInput
from app.serving.signature import ModelSignature

if TYPE_CHECKING:
    from app.settings import Settings


class RuntimeConfig(BaseModel):
    """The options of a runtime, as an endpoint's ``config`` sets them. Subclasses declare
    each field with a description; unknown keys are refused, so a typo is a 422, not a
    silently ignored option."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRuntime(ABC):
    name: ClassVar[str]
    # The typed options of this runtime (a RuntimeConfig subclass with every field documented).
    Config: ClassVar[type[RuntimeConfig]] = RuntimeConfig
    # False for runtimes that serve from elsewhere (a remote Triton server): the loader then
    # skips fetching the MLflow artifacts and ``load`` gets ``model_dir=None``.
    needs_artifact: ClassVar[bool] = True
    # True when ``predict`` waits on the network: the ModelServer runs it off its event loop.
    blocking_io: ClassVar[bool] = False

    def __init__(self, config: RuntimeConfig | dict[str, Any] | None = None, settings: Settings | None = None):
        """``config``: this runtime's options (a dict is checked against ``Config``);
        ``settings``: the platform's, for defaults and the limits :meth:`check_config` applies
        (None: the defaults of each setting)."""
        if isinstance(config, self.Config):
            self.config = config
        else:  # a dict, or another runtime's config (whose options this one may not take)
            self.config = parse_config(type(self), dict(config or {}))
        self.settings = settings
        self.check_config(self.config, settings)
        self.signature: ModelSignature | None = None
        self.ready = False
        self.warm_call_s: float | None = None  # one 1-row call, timed by warm_up()
        self.model_name = ""  # the registered model it serves, set by the loader (metrics labels)

    @classmethod
    def check_config(cls, config: RuntimeConfig, settings: Settings | None) -> None:
        """Checks of a valid config against the platform's settings (allowed hosts, upper
        bounds). Raise :class:`~app.errors.InvalidInput` naming ``config.<field>``. Runs when an
        endpoint is created or changed, and again when a replica opens the runtime."""

    def serving_default(self, value: int | None, setting: str) -> int:
        """An option's value, else the ``serving`` setting of that name (1 without settings)."""
        if value is not None:
            return value
        return int(getattr(self.settings.serving, setting)) if self.settings is not None else 1

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


def parse_config(cls: type[ModelRuntime], raw: dict[str, Any], also: Iterable[str] = ()) -> RuntimeConfig:
    """``raw`` checked against ``cls.Config``; a bad value is an InvalidInput naming
    ``config.<field>``. ``also``: other keys the caller accepts, named in the message about
    an unknown key."""
    try:
        return cls.Config.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, f"the {cls.name} runtime", cls.Config, also) from None


def config_error(
    exc: ValidationError, owner: str, model: type[BaseModel], also: Iterable[str] = ()
) -> InvalidInput:
    """A pydantic error on a config as a 422 naming each field (``config.<field>``). The input
    values are never shown: a config may hold credentials (``headers``)."""
    problems, fields = [], []
    for err in exc.errors()[:10]:
        field = "config" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
        fields.append(field)
        if err["type"] == "extra_forbidden":
            known = sorted({*model.model_fields, *also})
            problems.append(f"{field} is not an option of {owner}; its options are: {', '.join(known) or 'none'}")
        elif err["type"] == "missing":
            declared = model.model_fields.get(str(err["loc"][0])) if err.get("loc") else None
            about = declared.description if declared is not None else None
            problems.append(f"{field} is required by {owner}" + (f": {about}" if about else ""))
        else:
            problems.append(f"{field}: {err['msg'].removeprefix('Value error, ')}")
    return InvalidInput("; ".join(problems), details={"field": fields[0] if fields else "config"})
