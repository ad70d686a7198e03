"""An endpoint's ``config``: the keys every endpoint has, whatever its runtime (which pool
serves it, how many rows a request may hold), and the typed config of its runtime
(``<Runtime>.Config`` in ``app/runtimes/``).

The endpoint API checks a config here when an endpoint is created or changed, so a bad one is
a 422 naming ``config.<field>`` at once rather than at the first prediction. Only the runtime's
part opens a separate runtime instance: it alone goes into the multiplexed model id
(``[runtime:]name/version[#config]``, :func:`app.serving.loader.model_id_for`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import InvalidInput
from app.runtimes.base import RuntimeConfig, config_error, get_runtime_class, parse_config

if TYPE_CHECKING:
    from app.settings import Settings


class EndpointOptions(BaseModel):
    """The keys of an endpoint's config that are not its runtime's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["cpu", "gpu"] = Field(
        "cpu", description="Which ModelServer pool serves the endpoint: gpu exists only on clusters with GPUs."
    )
    max_rows: int | None = Field(
        None, gt=0, description="Most rows in one request to this endpoint. Default: serving.max_batch_rows."
    )
    placement: Literal["gateway", "model_server"] | None = Field(
        None, description="Where the model runs. gateway: in the process of the Gateway replica that took the "
        "request (no hop to another replica: the fastest path; ONNX on CPU only, since an ONNX graph is data for "
        "ONNX Runtime while other formats run code, and the Gateway holds the platform's credentials). "
        "model_server: a ModelServer replica (Serve's multiplexing across replicas, their own CPUs and queue). "
        "Default: gateway for ONNX on CPU when serving.inline_onnx is on, else model_server. For an ensemble "
        "target: where the fan-out runs (gateway: this replica calls the members, ONNX-CPU ones inline; "
        "model_server: the Ensemble deployment calls them on ModelServer replicas); default gateway when every "
        "member is ONNX on CPU and serving.inline_onnx is on, else model_server.",
    )
    ensemble: Literal["fanout", "fused"] | None = Field(
        None, description="How an ensemble target is served. fanout (default): every member called in parallel "
        "and their answers combined, with the ensemble's quorum policy. fused: the version's fused ONNX graph "
        "(members and combiner in one graph) through the single-model path; only for versions that have one "
        "(a 422 otherwise, and for targets that are not ensembles).",
    )


ENDPOINT_KEYS = frozenset(EndpointOptions.model_fields)


@dataclass(frozen=True)
class EndpointConfig:
    options: EndpointOptions
    runtime: RuntimeConfig

    def runtime_key(self) -> str | None:
        """A short digest of the runtime config's non-default values (None when all are
        defaults): two endpoints share a runtime instance exactly when these agree."""
        values = self.runtime.model_dump(mode="json", exclude_defaults=True)
        if not values:
            return None
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def parse_endpoint_config(runtime: str, config: dict[str, Any] | None) -> EndpointConfig:
    """``config`` split into the endpoint's options and ``runtime``'s typed config, each
    checked; any bad key or value is an InvalidInput naming ``config.<field>``."""
    config = config or {}
    if not isinstance(config, dict):
        raise InvalidInput("config must be an object of options", details={"field": "config"})
    cls = get_runtime_class(runtime)
    try:
        options = EndpointOptions.model_validate({k: v for k, v in config.items() if k in ENDPOINT_KEYS})
    except ValidationError as exc:
        raise config_error(exc, "every endpoint", EndpointOptions) from None
    if options.placement == "gateway" and (runtime != "onnx" or options.device != "cpu"):
        raise InvalidInput(
            f"config.placement 'gateway' serves ONNX models on CPU only (this endpoint: runtime {runtime!r}, device "
            f"{options.device!r}); omit placement or use 'model_server'",
            details={"field": "config.placement"},
        )
    rest = {k: v for k, v in config.items() if k not in ENDPOINT_KEYS}
    return EndpointConfig(options, parse_config(cls, rest, also=ENDPOINT_KEYS))


def serves_in_gateway(runtime: str, config: dict[str, Any] | None, inline_onnx: bool) -> bool:
    """Whether the Gateway runs this endpoint's model itself (see EndpointOptions.placement);
    ``config`` has been checked when the endpoint was stored."""
    placement = (config or {}).get("placement")
    if placement is not None:
        return placement == "gateway"
    return inline_onnx and runtime == "onnx" and (config or {}).get("device", "cpu") == "cpu"


def check_endpoint_config(runtime: str, config: dict[str, Any] | None, settings: Settings) -> EndpointConfig:
    """:func:`parse_endpoint_config` and the runtime's checks against ``settings`` (allowed
    hosts, upper bounds): what creating or changing an endpoint runs."""
    parsed = parse_endpoint_config(runtime, config)
    get_runtime_class(runtime).check_config(parsed.runtime, settings)
    return parsed
