"""The one predict path: an endpoint (or a name the Open Inference Protocol serves) becomes a
:class:`Plan` -- the model call to make, under which traffic variant, and the shadows to copy
the request to -- and the :class:`EndpointRouter` runs it. ``POST /v1/endpoints/{name}/predict``,
the V2 infer routes and their gRPC twin all go through :meth:`EndpointRouter.predict`, which is
also the one place that records each prediction (the prediction log) and its request metrics.

An ensemble version (``matih.kind: ensemble``) served as a fan-out is a leg whose ``combine``
is ``"ensemble"``: its members come from the version's definition and
:mod:`app.ensembles.serving` runs them (in this replica or in the Ensemble deployment), so the
request is still one request here: one metric, one prediction-log record, under the
ensemble's name and version.

An endpoint with a traffic plan (:mod:`app.traffic.spec`, the spec's ``traffic``) picks one
variant per request, in this replica: a :class:`app.traffic.choice.Chooser` built once per spec
version turns the sticky key (or a random number) into a variant with a bisect over cumulative
weights, and only that variant's target is resolved. No Serve hop is added to the request:
docs/architecture.md records the measurement behind that choice. Bandit strategies re-weigh
their chooser at most once per ``serving.bandit_refresh_s`` from the rewards in the store
(:mod:`app.traffic.bandits`), read in the background. Shadows get a copy of a sampled request
after the primary answered, as tasks this request never awaits, at most
``serving.shadow_max_in_flight`` calls of each shadow at once per replica (more are dropped
and counted); their
answers are logged under :func:`app.predlog.layout.shadow_log` with the primary's request id.

Plans are built per request from what the Gateway replica caches: the endpoint row (dropped
the moment any replica changes the endpoint: the RegistryCache's change feed pushes
``endpoint:<name>``) and the alias resolution (dropped on alias changes through the same
feed), so building one costs a few dictionary lookups.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from cachetools import LRUCache

from app import metrics
from app.errors import Conflict, DependencyUnavailable, InvalidInput, MatihError, NotFound
from app.features.enrichment import FeatureEnrichment
from app.names import parse_version
from app.predlog.layout import shadow_log
from app.predlog.records import PredictionRecord
from app.registry.mlflow_registry import ResolvedModel, model_metadata
from app.registry.targets import parse_target
from app.serving.endpoint_spec import DEFAULT_SPEC, EndpointSpec, LoggingSpec
from app.traffic.choice import Chooser, bandit_weights
from app.traffic.spec import ShadowSpec, TrafficSpec

log = logging.getLogger(__name__)

# What /v2/models/{name} serves when ``name`` is a registered model and no endpoint.
DEFAULT_ALIAS = "champion"
# Change-feed keys of endpoints in the RegistryCache's feed (model names cannot hold ':').
ENDPOINT_KEY_PREFIX = "endpoint:"
_SPEC_CACHE_SIZE = 4096
_META_CACHE_SIZE = 4096


def endpoint_key(name: str) -> str:
    return ENDPOINT_KEY_PREFIX + name


def _combine_of(model: ResolvedModel, config: dict[str, Any] | None) -> str:
    """``ensemble`` for an ensemble version served as a fan-out; ``single`` otherwise (an
    ensemble with ``config.ensemble: fused`` is a plain ONNX model, 409 when it has no fused graph)."""
    from app.ensembles.serving import FUSED, check_fused_servable, ensemble_mode, is_ensemble

    if not is_ensemble(model):
        return "single"
    if ensemble_mode(config) == FUSED:
        check_fused_servable(model)
        return "single"
    return "ensemble"


def _leg(variant: str, model: ResolvedModel, runtime: str, config: dict[str, Any] | None) -> Leg:
    return Leg(variant, model, runtime, config or None, _combine_of(model, config))


@dataclass(frozen=True, slots=True)
class Leg:
    """The model call of a plan."""

    variant: str  # the traffic variant ("" when the endpoint has no traffic plan)
    model: ResolvedModel
    runtime: str
    config: dict[str, Any] | None
    combine: str = "single"  # "single": the model's answer; "ensemble": an ensemble's fan-out


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request to ``name`` does: the model call (of the variant chosen for this request)
    and the shadows that get a copy of it."""

    name: str  # the endpoint, or the registered model a V2 request names
    endpoint: bool  # False: a registered model served by V2 without an endpoint
    legs: tuple[Leg, ...]
    logging: LoggingSpec
    spec_version: int = 0
    shadows: tuple[ShadowSpec, ...] = ()
    # The endpoint's runtime and config: what a shadow without a runtime of its own runs with.
    runtime: str = "onnx"
    config: dict[str, Any] | None = None
    # The endpoint's feature enrichment (spec.features): stored features joined before the model call.
    features: FeatureEnrichment | None = None

    @property
    def primary(self) -> Leg:
        return self.legs[0]

    @property
    def combine(self) -> str:
        return self.primary.combine


@dataclass(slots=True)
class _Choice:
    """A traffic plan's chooser, kept per (endpoint, spec version), and its bandit refresh."""

    traffic: TrafficSpec
    chooser: Chooser
    by_name: dict[str, Any]
    refreshed: float = 0.0  # time.monotonic() of the last bandit refresh (0: never)
    refreshing: bool = False
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Routed:
    """What a routed prediction produced."""

    output: dict[str, Any]  # the model's answer: {"predictions": [...], "probabilities"?: [...]}
    leg: Leg
    request_id: str
    # An enriching endpoint's {"stale": [...], "missing": [...]}; None when it does not enrich.
    features: dict[str, list[str]] | None = None


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
        arms: Callable[[str, list[str]], Awaitable[dict[str, Any]]] | None = None,
        bandit_refresh_s: float = 1.0,
        shadow_max_in_flight: int = 8,
        enricher: Any = None,
    ):
        """``ensembles``: runs an ensemble leg (:class:`app.ensembles.serving.EnsembleDispatch`:
        ``predict(model, payload, config, explain)``); None = ensembles are refused (409).
        ``arms(endpoint, variants)``: the bandit arms' reward sums (:class:`app.traffic.bandits.ArmStats`
        by variant) from the store, rewards that were waiting for their log record counted
        first; None = bandit plans keep their configured weights.
        ``bandit_refresh_s``: how often a bandit plan is re-weighed from them;
        ``shadow_max_in_flight``: calls of one shadow (of one endpoint) this router runs at once
        (more are dropped): a slow shadow cannot starve another.
        ``enricher``: joins stored features to the requests of endpoints with ``spec.features``
        (:class:`app.features.enrichment.Enricher`); None = such endpoints answer 503."""
        self._endpoint = endpoint
        self._resolve = resolve
        self.predictor = predictor
        self.buffer = buffer
        self._status_for = status_for
        self.ensembles = ensembles
        self._specs: LRUCache = LRUCache(maxsize=_SPEC_CACHE_SIZE)  # (name, spec_version) -> EndpointSpec
        self._features: LRUCache = LRUCache(maxsize=_META_CACHE_SIZE)  # model id -> (task, feature names)
        self._choices: LRUCache = LRUCache(maxsize=_SPEC_CACHE_SIZE)  # (name, spec_version) -> _Choice
        self._arms = arms
        self._bandit_refresh_s = bandit_refresh_s
        self._shadow_limit = shadow_max_in_flight
        self._shadows_in_flight: dict[tuple[str, str], int] = {}  # (endpoint, shadow) -> calls running
        self._background: set[asyncio.Task] = set()  # shadow calls and bandit refreshes in flight
        self._rng = random.Random()
        self.enricher = enricher

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

    async def plan(self, name: str, sticky: Callable[[str], str | None] | None = None) -> Plan:
        """The plan of the endpoint ``name`` for one request (NotFound when there is none).
        ``sticky(field)``: the request's sticky key, asked with the plan's ``sticky.key`` (the
        route looks in the X-Matih-Sticky header, then in that body field); None or a None
        answer = the variant is drawn at random by the weights."""
        row = await self._endpoint(name)
        return await self._endpoint_plan(row, sticky)

    async def _endpoint_plan(self, row: dict[str, Any], sticky: Callable[[str], str | None] | None = None) -> Plan:
        spec = self.spec_of(row)
        traffic = spec.traffic
        runtime, config = row["runtime"], row["config"] or None
        version = row.get("spec_version", 0)
        if traffic is None:
            leg = _leg("", await self._resolve(row["target"]), runtime, config)
            return Plan(row["name"], True, (leg,), spec.logging, version, runtime=runtime, config=config,
                        features=spec.features)
        choice = self._choice(row["name"], version, traffic)
        key = sticky(traffic.sticky.key) if sticky is not None and traffic.sticky is not None else None
        variant = choice.by_name[choice.chooser.choose(key, self._rng)]
        if variant.runtime is not None:
            runtime, config = variant.runtime, variant.config or None
        leg = _leg(variant.name, await self._resolve(variant.target), runtime, config)
        return Plan(row["name"], True, (leg,), spec.logging, version, tuple(traffic.shadows),
                    row["runtime"], row["config"] or None, spec.features)

    def _choice(self, name: str, version: int, traffic: TrafficSpec) -> _Choice:
        key = (name, version)
        choice = self._choices.get(key)
        if choice is None:
            choice = self._choices[key] = _Choice(
                traffic, Chooser.from_spec(traffic), {v.name: v for v in traffic.variants}
            )
        if traffic.strategy != "fixed" and self._arms is not None and not choice.refreshing \
                and time.monotonic() - choice.refreshed >= self._bandit_refresh_s:
            choice.refreshing = True
            self._spawn(self._refresh(name, choice))
        return choice

    async def _refresh(self, name: str, choice: _Choice) -> None:
        """Re-weigh a bandit plan's chooser from the rewards in the store (in the background:
        requests meanwhile use the weights it has)."""
        import numpy as np

        try:
            traffic = choice.traffic
            arms = await self._arms(name, [v.name for v in traffic.variants])
            weights = bandit_weights(
                traffic.strategy, arms, [v.name for v in traffic.variants], traffic.bandit,
                rng=np.random.default_rng(),
            )
            choice.chooser.update(weights)
            choice.weights = weights
        except Exception:  # noqa: BLE001 - the next refresh tries again; the chooser keeps its weights
            log.warning("bandit weights of %s not refreshed", name, exc_info=True)
        finally:
            choice.refreshed = time.monotonic()
            choice.refreshing = False

    def bandit_state(self, name: str, version: int) -> dict[str, float] | None:
        """The weights this replica's chooser of ``name`` (at ``version``) last took from the
        rewards; None before the first refresh."""
        choice = self._choices.get((name, version))
        return dict(choice.weights) if choice is not None and choice.weights else None

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def v2_plan(
        self, name: str, version: str | None, sticky: Callable[[str], str | None] | None = None
    ) -> Plan:
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
                return await self._endpoint_plan(row, sticky)
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
        return Plan(name, False, (_leg("", model, "onnx", None),), DEFAULT_SPEC.logging)

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
        endpoint keeps; one that failed with a 5xx with its status and no outputs) and the
        request's metrics, and copy the request to the plan's shadows. Logging and shadows never fail or delay the
        answer. ``explain``: an ensemble's answer also holds its members' (``members``)."""
        leg = plan.primary
        code = 200
        out: dict[str, Any] | None = None
        enriched = None
        spec = plan.logging
        logged = self.buffer is not None and spec.enabled and (
            spec.sample_rate >= 1.0 or random.random() < spec.sample_rate)
        # The log keeps probabilities the caller did not ask for (spec.logging.probabilities): the
        # model is asked for them, and they are taken out of the answer below.
        extra_probabilities = logged and spec.probabilities and not payload.get("return_probabilities")
        try:
            if plan.features is not None:
                payload, enriched = await self._enrich(plan.features, leg, payload)
            out = await self._call(leg, {**payload, "return_probabilities": True} if extra_probabilities else payload,
                                   explain)
        except MatihError as exc:
            code = self._status_for(exc)
            raise
        except BaseException:
            code = 500
            raise
        finally:
            seconds = time.perf_counter() - info.started
            metrics.request(plan.name, leg.model.name, leg.model.version, leg.variant, info.protocol, code, seconds)
            # A refused request (4xx: the caller's mistake) is neither logged nor copied to the
            # shadows; a failed one (5xx: the model's or the platform's) is, with its status: the
            # error rate of a variant. A sampled-out request's shadows are not logged either, so
            # the shadow log pairs with the primary's.
            if not 400 <= code < 500:
                if logged:
                    self._record(plan.name, spec, leg, payload, out, info, seconds, code,
                                 features=enriched.used if enriched is not None else None)
                if plan.shadows:
                    self._shadow(plan, payload, info, logged)
        if extra_probabilities and out is not None and "probabilities" in out:
            out = {k: v for k, v in out.items() if k != "probabilities"}
        return Routed(out, leg, info.request_id, enriched.report if enriched is not None else None)

    async def _enrich(self, spec: FeatureEnrichment, leg: Leg, payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The payload with the endpoint's stored features merged in (app.features.enrichment)."""
        if self.enricher is None:
            raise DependencyUnavailable("this endpoint joins stored features, and this Gateway has no feature store")
        return await self.enricher.enrich(spec, payload, self.task_and_features(leg.model)[1])

    async def _call(self, leg: Leg, payload: dict[str, Any], explain: bool) -> dict[str, Any]:
        if leg.combine == "ensemble":
            if self.ensembles is None:
                raise Conflict(f"ensemble {leg.model.model_id} cannot be served here (no ensemble runner)")
            return await self.ensembles.predict(leg.model, payload, leg.config, explain)
        return await self.predictor.predict(leg.model, payload, leg.runtime, leg.config)

    # -- shadows -------------------------------------------------------------------------------
    def _shadow(self, plan: Plan, payload: dict[str, Any], info: RequestInfo, logged: bool) -> None:
        """Start the sampled shadows' calls; none is awaited by the request. ``logged``: the
        primary's record went to the log, and so will the shadows' answers."""
        for shadow in plan.shadows:
            if shadow.sample < 1.0 and self._rng.random() >= shadow.sample:
                continue
            key = (plan.name, shadow.label)
            running = self._shadows_in_flight.get(key, 0)
            if running >= self._shadow_limit:
                metrics.shadow(plan.name, shadow.label, "dropped", 0.0)
                continue
            self._shadows_in_flight[key] = running + 1
            self._spawn(self._run_shadow(plan, shadow, payload, info, logged))

    async def _run_shadow(
        self, plan: Plan, shadow: ShadowSpec, payload: dict[str, Any], info: RequestInfo, logged: bool
    ) -> None:
        started = time.perf_counter()
        code, out, leg = 200, None, None
        try:
            runtime, config = (shadow.runtime, shadow.config or None) if shadow.runtime else (plan.runtime, plan.config)
            leg = _leg(shadow.label, await self._resolve(shadow.target), runtime, config)
            out = await self._call(leg, payload, False)
        except MatihError as exc:
            code = self._status_for(exc)
        except Exception:  # noqa: BLE001 - a shadow's failure is recorded, never raised
            code = 500
            log.debug("shadow %s of %s failed", shadow.label, plan.name, exc_info=True)
        finally:
            key = (plan.name, shadow.label)
            left = self._shadows_in_flight.get(key, 1) - 1
            if left > 0:
                self._shadows_in_flight[key] = left
            else:
                self._shadows_in_flight.pop(key, None)
        seconds = time.perf_counter() - started
        metrics.shadow(plan.name, shadow.label, "ok" if code < 400 else "error", seconds)
        if leg is not None and logged:
            shadow_info = RequestInfo(info.request_id, info.client_request_id, info.caller, info.protocol,
                                      started, info.arrived)
            self._record(shadow_log(plan.name), plan.logging, leg, payload, out, shadow_info, seconds, code,
                         inputs=False)

    # -- the prediction log ------------------------------------------------------------------------
    def _record(
        self, log_name: str, spec: LoggingSpec, leg: Leg, payload: dict[str, Any], out: dict[str, Any] | None,
        info: RequestInfo, seconds: float, status: int, *, inputs: bool = True,
        features: list[dict[str, Any]] | None = None,
    ) -> None:
        """Hand the buffer one record (the caller has decided it is sampled in)."""
        keep = spec.fields
        inputs = inputs and "inputs" in keep
        try:
            record = PredictionRecord(
                request_id=info.request_id,
                timestamp=info.arrived,
                endpoint=log_name,
                variant=leg.variant,
                model=leg.model.name,
                model_version=str(leg.model.version),
                latency_ms=seconds * 1000.0,
                inputs={k: v for k, v in payload.items() if k != "return_probabilities"} if inputs else None,
                feature_names=self.task_and_features(leg.model)[1] if inputs else None,
                outputs={k: v for k, v in out.items() if k != "members"} if "outputs" in keep and out else None,
                caller=info.caller if "caller" in keep else None,
                client_request_id=info.client_request_id if "client_request_id" in keep else None,
                protocol=info.protocol,
                status=status,
                features=features,
            )
            self.buffer.add(record)
        except Exception:  # noqa: BLE001 - a log record is never worth a failed prediction
            log.exception("prediction-log record of %s not recorded", log_name)
