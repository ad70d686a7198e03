"""The one predict path: an endpoint (or a name the Open Inference Protocol serves) becomes a
:class:`Plan` -- the model calls to make and how to combine their answers -- and the
:class:`EndpointRouter` runs it. ``POST /v1/endpoints/{name}/predict``, the V2 infer routes
and their gRPC twin all go through :meth:`EndpointRouter.predict`, which is also the one place
that records each prediction (the prediction log) and its request metrics.

A plan has one leg today; an ensemble version (``matih.kind: ensemble``) served as a fan-out is
one leg whose plan combines ``"ensemble"``: its members come from the version's definition and
:mod:`app.ensembles.serving` runs them (in this replica or in the Ensemble deployment), so the
request is still one request here: one metric, one prediction-log record, under the
ensemble's name and version. Traffic splits add legs and ways to combine them; the routes do
not change. Plans are built per request from what the Gateway
replica caches: the endpoint row (dropped the moment any replica changes the endpoint: the
RegistryCache's change feed pushes ``endpoint:<name>``) and the alias resolution (dropped on
alias changes through the same feed), so building one costs a few dictionary lookups.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from cachetools import LRUCache

from app import metrics
from app.errors import Conflict, InvalidInput, MatihError, NotFound
from app.names import parse_version
from app.predlog.records import PredictionRecord
from app.registry.mlflow_registry import ResolvedModel, model_metadata
from app.registry.targets import parse_target
from app.serving.endpoint_spec import DEFAULT_SPEC, EndpointSpec, LoggingSpec

# What /v2/models/{name} serves when ``name`` is a registered model and no endpoint.
DEFAULT_ALIAS = "champion"
# Change-feed keys of endpoints in the RegistryCache's feed (model names cannot hold ':').
ENDPOINT_KEY_PREFIX = "endpoint:"
_SPEC_CACHE_SIZE = 4096
_META_CACHE_SIZE = 4096


def endpoint_key(name: str) -> str:
    return ENDPOINT_KEY_PREFIX + name


def _combine_of(leg: Leg) -> str:
    """``ensemble`` for an ensemble version served as a fan-out; ``single`` otherwise (an
    ensemble with ``config.ensemble: fused`` is a plain ONNX model, 409 when it has no fused graph)."""
    from app.ensembles.serving import FUSED, check_fused_servable, ensemble_mode, is_ensemble

    if not is_ensemble(leg.model):
        return "single"
    if ensemble_mode(leg.config) == FUSED:
        check_fused_servable(leg.model)
        return "single"
    return "ensemble"


@dataclass(frozen=True, slots=True)
class Leg:
    """One model call of a plan."""

    variant: str  # the traffic variant ("" while an endpoint has a single leg)
    model: ResolvedModel
    runtime: str
    config: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request to ``name`` does: the legs to call and how to combine them."""

    name: str  # the endpoint, or the registered model a V2 request names
    endpoint: bool  # False: a registered model served by V2 without an endpoint
    legs: tuple[Leg, ...]
    logging: LoggingSpec
    spec_version: int = 0
    combine: str = "single"  # "single": the one leg's answer; "ensemble": the leg is an ensemble's fan-out

    @property
    def primary(self) -> Leg:
        return self.legs[0]


@dataclass(slots=True)
class Routed:
    """What a routed prediction produced."""

    output: dict[str, Any]  # the model's answer: {"predictions": [...], "probabilities"?: [...]}
    leg: Leg
    request_id: str


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Who asked, under which ids: what the prediction log records beside the prediction."""

    request_id: str  # server-issued (app.predlog.ids)
    client_request_id: str | None
    caller: str | None
    protocol: str  # rest | v2 | grpc
    started: float  # time.perf_counter() when the request arrived
    arrived: float  # time.time() when the request arrived


class EndpointRouter:
    """Builds plans and runs them (see the module docstring).

    ``endpoint(name)``: the endpoint row (cached by the caller, raising NotFound);
    ``resolve(target, use_cache)``: a servable ResolvedModel; ``predictor``: runs one model call
    (``predict(model, payload, runtime, config)``); ``buffer``: where prediction-log records go
    (``add(record) -> bool``, never blocking), None = no log; ``status_for``: the HTTP status of
    an error, for the request metrics."""

    def __init__(
        self,
        *,
        endpoint: Callable[[str], Awaitable[dict[str, Any]]],
        resolve: Callable[..., Awaitable[ResolvedModel]],
        predictor: Any,
        buffer: Any = None,
        status_for: Callable[[MatihError], int] = lambda exc: 500,
        ensembles: Any = None,
    ):
        """``ensembles``: runs an ensemble leg (:class:`app.ensembles.serving.EnsembleDispatch`:
        ``predict(model, payload, config, explain)``); None = ensembles are refused (409)."""
        self._endpoint = endpoint
        self._resolve = resolve
        self.predictor = predictor
        self.buffer = buffer
        self._status_for = status_for
        self.ensembles = ensembles
        self._specs: LRUCache = LRUCache(maxsize=_SPEC_CACHE_SIZE)  # (name, spec_version) -> EndpointSpec
        self._features: LRUCache = LRUCache(maxsize=_META_CACHE_SIZE)  # model id -> (task, feature names)

    # -- plans ---------------------------------------------------------------------------------
    def spec_of(self, row: dict[str, Any]) -> EndpointSpec:
        """The endpoint's spec, parsed once per spec version."""
        key = (row["name"], row.get("spec_version", 0))
        spec = self._specs.get(key)
        if spec is None:
            raw = row.get("spec") or {}
            spec = EndpointSpec.model_validate(raw) if raw else DEFAULT_SPEC
            self._specs[key] = spec
        return spec

    async def plan(self, name: str) -> Plan:
        """The plan of the endpoint ``name`` (NotFound when there is none)."""
        row = await self._endpoint(name)
        return await self._endpoint_plan(row)

    async def _endpoint_plan(self, row: dict[str, Any]) -> Plan:
        model = await self._resolve(row["target"])
        spec = self.spec_of(row)
        leg = Leg("", model, row["runtime"], row["config"] or None)
        return Plan(row["name"], True, (leg,), spec.logging, row.get("spec_version", 0), _combine_of(leg))

    async def v2_plan(self, name: str, version: str | None) -> Plan:
        """What ``/v2/models/{name}[/versions/{version}]`` serves. Without a version, an endpoint
        of that name wins (its target, runtime, config and spec); otherwise the registered model
        ``{name}@champion`` serves. With a version, ``name`` is always a registered model and
        ``{name}/{version}`` serves in the default runtime. Requests to a registered model are
        logged under its name with the platform's default logging."""
        if version is None:
            try:
                row = await self._endpoint(name)
            except NotFound:
                row = None
            if row is not None:
                return await self._endpoint_plan(row)
            target = f"{name}@{DEFAULT_ALIAS}"
            missing = (
                f"model {name!r} is neither an endpoint nor a registered model with a {DEFAULT_ALIAS!r} alias; "
                "GET /v1/endpoints and /v1/models list them"
            )
        else:
            target = f"{name}/{parse_version(version)}"
            missing = f"model {name!r} has no version {version!r} in the registry"
        try:
            parse_target(target)
        except InvalidInput:
            raise NotFound(missing, details={"model": name, "version": version}) from None
        try:
            model = await self._resolve(target)
        except NotFound:
            raise NotFound(missing, details={"model": name, "version": version}) from None
        leg = Leg("", model, "onnx", None)
        return Plan(name, False, (leg,), DEFAULT_SPEC.logging, combine=_combine_of(leg))

    def task_and_features(self, model: ResolvedModel) -> tuple[str | None, list[str] | None]:
        key = model.model_id
        hit = self._features.get(key)
        if hit is None:
            meta = model_metadata(model)
            hit = self._features[key] = (meta.get("task"), meta.get("feature_names"))
        return hit

    # -- running a plan --------------------------------------------------------------------------
    async def predict(self, plan: Plan, payload: dict[str, Any], info: RequestInfo, explain: bool = False) -> Routed:
        """Run ``plan`` on ``payload``; record the prediction (sampled, with the fields the
        endpoint keeps) and the request's metrics. Logging never fails or delays the answer.
        ``explain``: an ensemble's answer also holds its members' (``members``)."""
        leg = plan.primary
        code = 200
        try:
            if plan.combine == "ensemble":
                if self.ensembles is None:
                    raise Conflict(f"ensemble {leg.model.model_id} cannot be served here (no ensemble runner)")
                out = await self.ensembles.predict(leg.model, payload, leg.config, explain)
            else:
                out = await self.predictor.predict(leg.model, payload, leg.runtime, leg.config)
        except MatihError as exc:
            code = self._status_for(exc)
            raise
        except BaseException:
            code = 500
            raise
        finally:
            seconds = time.perf_counter() - info.started
            metrics.request(plan.name, leg.model.name, leg.model.version, leg.variant, info.protocol, code, seconds)
        if self.buffer is not None and plan.logging.enabled:
            self._record(plan, leg, payload, out, info, seconds)
        return Routed(out, leg, info.request_id)

    def _record(
        self, plan: Plan, leg: Leg, payload: dict[str, Any], out: dict[str, Any], info: RequestInfo, seconds: float
    ) -> None:
        spec = plan.logging
        if spec.sample_rate < 1.0 and random.random() >= spec.sample_rate:
            return
        keep = spec.fields
        try:
            record = PredictionRecord(
                request_id=info.request_id,
                timestamp=info.arrived,
                endpoint=plan.name,
                variant=leg.variant,
                model=leg.model.name,
                model_version=str(leg.model.version),
                latency_ms=seconds * 1000.0,
                inputs={k: v for k, v in payload.items() if k != "return_probabilities"} if "inputs" in keep else None,
                feature_names=self.task_and_features(leg.model)[1] if "inputs" in keep else None,
                outputs={k: v for k, v in out.items() if k != "members"} if "outputs" in keep else None,
                caller=info.caller if "caller" in keep else None,
                client_request_id=info.client_request_id if "client_request_id" in keep else None,
                protocol=info.protocol,
            )
            self.buffer.add(record)
        except Exception:  # noqa: BLE001 - a log record is never worth a failed prediction
            import logging

            logging.getLogger(__name__).exception("prediction-log record of %s not recorded", plan.name)
