"""The HTTP API as a FastAPI app, built around an :class:`ApiContext`.

The Gateway deployment builds the context with Ray-backed services (ModelServer handle,
JobScheduler actor); unit tests build it with in-process ones. Routes hold no Ray code.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from cachetools import TTLCache
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from app import __version__
from app.api.deadline import RequestDeadline
from app.api.errors import error_response, install_error_handlers
from app.auth import Authenticator, Principal, Role
from app.errors import InvalidInput, MatihError, NotFound, PayloadTooLarge, PermissionDenied
from app.features.enrichment import Enricher
from app.redaction import redact
from app.registry.mlflow_registry import ModelRegistry, ResolvedModel, check_servable
from app.registry.targets import ModelRef, parse_target
from app.schemas import (
    EndpointCreate,
    EndpointUpdate,
    JobAccepted,
    JobView,
    Page,
    PredictRequest,
    PredictResponse,
    TokenCreate,
)
from app.ensembles.serving import check_ensemble_target, ensemble_dispatch, wants_explain
from app.serving.endpoint_config import check_endpoint_config
from app.serving.request_ids import ids_of
from app.serving.routing import EndpointRouter, RequestInfo
from app.settings import Settings
from app.traffic.spec import STICKY_HEADER, VARIANT_HEADER
from app.store import MetadataStore, redacted_endpoint


_ENDPOINT_CACHE_SIZE = 4096  # endpoint rows a replica keeps (least recently used go first)


class Predictor(Protocol):
    async def predict(
        self, model: ResolvedModel, payload: dict[str, Any], runtime: str = "onnx", config: dict | None = None,
        *, batch: bool = True,
    ) -> dict[str, Any]:
        """Run ``payload`` through ``model`` in ``runtime`` (with the endpoint's runtime config);
        ``batch=False``: an ensemble member's call, never held back to batch with other requests."""
        ...


class Resolver(Protocol):
    async def resolve(self, ref: ModelRef, use_cache: bool = True) -> ResolvedModel: ...


class JobControl(Protocol):
    async def notify(self) -> None: ...

    async def cancel(self, job_id: str, actor: str) -> dict[str, Any]: ...


class GpuControl(Protocol):
    async def snapshot(self) -> dict[str, Any]: ...


@dataclass
class ApiContext:
    settings: Settings
    store: MetadataStore
    registry: ModelRegistry
    authenticator: Authenticator
    predictor: Predictor
    jobs: JobControl
    # Whether a GPU pool of ModelServers exists (only on clusters with GPUs).
    gpu_pool: bool = False
    # Alias resolution; None = straight from ``registry`` (its own TTL cache).
    resolver: Resolver | None = None
    # name -> async check raising on failure; /ready reports each one
    readiness: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    # Called after any change to a model's versions or aliases, so every cache of alias
    # resolutions drops it now rather than after its TTL. The Gateway fans this out to all
    # replicas through the RegistryCache actor; the default clears this process's cache.
    model_changed: Callable[[str], Awaitable[None]] | None = None
    # The Ray cluster's total resources ({"CPU": 2.0, "GPU": 0.0, ...}); None = unknown (no check).
    cluster_resources: Callable[[], Awaitable[dict[str, float]]] | None = None
    # GPU inventory and reservations (the GPUManager actor); None = no GPU manager here.
    gpus: GpuControl | None = None
    # Runs ensemble fan-outs (app.ensembles.serving.EnsembleDispatch); None = in this process
    # through ``predictor``, without meta-learners (nothing here fetches their artifacts).
    ensembles: Any = None
    # Runs a RegistryService method that reads and converts a model file (registration from an
    # upload or a source file, POST .../convert): ``await registry_offload(method, *args, **kw)``;
    # a ``"module:function"`` method names a function called as ``function(settings, registry,
    # store, *args, **kw)`` (an ensemble's creation, which loads its members' ONNX graphs).
    # None = a thread of this process. The Gateway runs them as Ray tasks, so that a conversion
    # (skl2onnx or torch.onnx and the parity check: seconds of CPU, much memory) holds neither
    # the ingress's interpreter lock nor its memory while it serves predictions.
    registry_offload: Callable[..., Awaitable[Any]] | None = None
    # Where the serving path puts prediction-log records (app.predlog.buffer.PredictionLogBuffer);
    # None = predictions are not logged in this process.
    prediction_buffer: Any = None
    # The prediction log's control side: stats, erasure, flush (the PredictionLog actor in the
    # Gateway, an in-process one in unit tests; see app/predlog); None = no prediction log.
    predlog: Any = None
    # Called after an endpoint changes (created, updated, deleted), so every replica drops its
    # cached row now: the Gateway pushes ``endpoint:<name>`` through the RegistryCache's change
    # feed, as alias changes go; None = only this process's cache.
    endpoint_changed: Callable[[str], Awaitable[None]] | None = None
    # The StreamIngestor's status (``await streams()`` -> app.features.streams.Ingestor.status()):
    # the actor in the Gateway, an in-process Ingestor in unit tests; None = no ingestor here
    # (GET /v1/features/streams then lists the declarations alone).
    streams: Callable[[], Awaitable[dict[str, Any]]] | None = None
    # Endpoint rows by name, trusted for serving.resolve_ttl_s (only this replica's event loop uses it).
    _endpoints: TTLCache = field(init=False, repr=False)
    # The one predict path (app.serving.routing), built from the services above.
    router: EndpointRouter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from app.api.errors import status_for

        self._endpoints = TTLCache(maxsize=_ENDPOINT_CACHE_SIZE, ttl=self.settings.serving.resolve_ttl_s)
        self.router = EndpointRouter(
            endpoint=self.endpoint,
            resolve=lambda target, use_cache=True: _resolve(self, target, use_cache),
            predictor=self.predictor,
            buffer=self.prediction_buffer if self.settings.predlog.enabled else None,
            status_for=status_for,
            ensembles=self.ensembles or ensemble_dispatch(self.predictor, self.settings),
            arms=self._bandit_arms,
            bandit_refresh_s=self.settings.serving.bandit_refresh_s,
            shadow_max_in_flight=self.settings.serving.shadow_max_in_flight,
            enricher=Enricher(self.settings),
        )

    async def _bandit_arms(self, name: str, variants: list[str]) -> dict[str, Any]:
        """The reward sums of a bandit plan's arms, after counting the rewards that arrived
        before their prediction's log record (``FeedbackStore.settle_pending``): a reward sent
        right after its prediction reaches the bandit within a refresh of the log's write."""
        from app.predlog.feedback import FeedbackStore
        from app.predlog.lookup import request_variants
        from app.traffic.bandits import BanditStore

        def read() -> dict[str, Any]:
            FeedbackStore(self.store).settle_pending(
                name, lambda ids: request_variants(self.settings, name, ids), bandit_arms=variants,
                window_s=2 * self.settings.predlog.feedback_grace_s + 60,
            )
            return BanditStore(self.store).arms(name)

        return await asyncio.to_thread(read)

    async def notify_model_changed(self, name: str) -> None:
        self.registry.invalidate(name)
        if self.model_changed is not None:
            await self.model_changed(name)

    async def endpoint(self, name: str) -> dict[str, Any]:
        row = self._endpoints.get(name)
        if row is None:
            row = await asyncio.to_thread(self.store.get_endpoint, name)
            self._endpoints[name] = row
        return row

    def forget_endpoint(self, name: str | None) -> None:
        """Drop ``name``'s cached row (None: every row)."""
        if name is None:
            self._endpoints.clear()
        else:
            self._endpoints.pop(name, None)

    async def notify_endpoint_changed(self, name: str) -> None:
        """Drop ``name``'s cached row here and, through ``endpoint_changed``, in every replica."""
        self.forget_endpoint(name)
        if self.endpoint_changed is not None:
            await self.endpoint_changed(name)


NONCRITICAL_DEPENDENCIES = frozenset({"mlflow"})


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413, by header or by count."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(scope, send)
        seen, too_large, rejected = 0, False, False

        async def limited_receive():
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    too_large = True
                    raise PayloadTooLarge(f"request body is over {self.limit} bytes")
            return message

        async def guarded_send(message):
            # FastAPI turns an error raised while it reads the body into its own 400; once the
            # body is over the limit, whatever the app answers is replaced by the 413.
            nonlocal rejected
            if not too_large:
                return await send(message)
            if not rejected:
                rejected = True
                await self._reject(scope, send)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except PayloadTooLarge:
            if not rejected:
                rejected = True
                await self._reject(scope, send)

    async def _reject(self, scope, send):
        error = PayloadTooLarge(f"request body is over the limit of {self.limit} bytes")
        await error_response(error)(scope, None, send)  # a JSONResponse never reads the request


def create_app(ctx: ApiContext) -> FastAPI:
    api = FastAPI(
        title="MATIH ML",
        version=__version__,
        description="Ray-native MLOps platform: training, registry, serving. Errors are "
        '`{"error": ..., "code": ...}`; authenticate with `Authorization: Bearer <token>`.',
    )
    api.state.ctx = ctx
    install_error_handlers(api)
    api.add_middleware(BodySizeLimit, limit=ctx.settings.http.max_body_bytes)
    api.add_middleware(RequestDeadline, limit_s=ctx.settings.http.request_timeout_s)

    viewer, predictor, developer, admin = role_dependencies(ctx)

    # -- health and metadata ---------------------------------------------------------------
    @api.get("/health", tags=["health"], summary="Liveness; no auth")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/ready", tags=["health"], summary="Readiness with each dependency's state; no auth")
    async def ready() -> JSONResponse:
        checks = {"metadata_store": lambda: asyncio.to_thread(ctx.store.ping), "mlflow": lambda: asyncio.to_thread(ctx.registry.ping)}
        checks.update(ctx.readiness)
        names = list(checks)
        limit = ctx.settings.serving.mlflow_timeout_s + 2
        results = await asyncio.gather(*(asyncio.wait_for(checks[n](), limit) for n in names), return_exceptions=True)
        deps = {}
        for name, res in zip(names, results):
            if isinstance(res, BaseException):
                msg = res.message if isinstance(res, MatihError) else (str(res) or type(res).__name__)
                deps[name] = {"status": "down", "error": redact(msg)}
            else:
                deps[name] = {"status": "up"}
        # MLflow is not needed to serve: models already resolved and loaded keep serving (last
        # known good), so MLflow being down degrades the platform without making it unready.
        ok = all(d["status"] == "up" for n, d in deps.items() if n not in NONCRITICAL_DEPENDENCIES)
        degraded = ok and any(d["status"] != "up" for d in deps.values())
        status = "degraded" if degraded else ("ok" if ok else "unavailable")
        return JSONResponse({"ready": ok, "status": status, "dependencies": deps}, status_code=200 if ok else 503)

    @api.get("/v1/info", tags=["health"], summary="Version, profile and enabled integrations")
    async def info(_: Principal = viewer) -> dict[str, Any]:
        s = ctx.settings
        from app.runtimes.base import RUNTIMES

        return {
            "name": "matih-ml",
            "version": __version__,
            "profile": s.profile,
            "integrations": {
                "mlflow": {"tracking_uri": redact(s.mlflow_tracking_uri)},
                "metadata_store": ctx.store.engine.dialect.name,
                "ray": {"address": redact(s.ray_address) if s.ray_address else "local"},
                "runtimes": sorted(RUNTIMES),
                "feast": {"repo_path": s.feast_repo_path, "project": s.features.project,
                          "online_store": s.features.online_store, "engine": s.features.engine},
                "s3": bool(s.s3_endpoint),
                "redis": bool(s.redis_url),
            },
            "auth": {"enabled": s.auth.enabled},
        }

    # -- tokens ----------------------------------------------------------------------------
    @api.post("/v1/tokens", status_code=201, tags=["auth"], summary="Issue a token with a role (admin)")
    async def create_token(body: TokenCreate, who: Principal = admin) -> dict[str, Any]:
        record, plaintext = await asyncio.to_thread(
            ctx.store.create_token, body.name, body.role, who.name, body.expiry()
        )
        return {**record, "token": plaintext}

    @api.delete("/v1/tokens/{token_id}", status_code=204, tags=["auth"], summary="Revoke a token (admin)")
    async def revoke_token(token_id: str, who: Principal = admin) -> Response:
        await asyncio.to_thread(ctx.store.revoke_token, token_id, who.name)
        return Response(status_code=204)

    # -- jobs ------------------------------------------------------------------------------
    @api.get("/v1/jobs", response_model=Page, tags=["jobs"], summary="List jobs of every kind")
    async def list_jobs(
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, kind: str | None = None,
        status: str | None = None, _: Principal = viewer,
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(
            ctx.store.list_jobs, kind=kind, status=status, limit=limit, page_token=page_token
        )
        return {"items": items, "next_page_token": nxt}

    @api.get("/v1/jobs/{job_id}", response_model=JobView, tags=["jobs"], summary="Status, progress, logs of a job")
    async def get_job(job_id: str, _: Principal = viewer) -> dict[str, Any]:
        return await asyncio.to_thread(ctx.store.get_job, job_id, with_logs=True)

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobView, tags=["jobs"], summary="Cancel a job",
              description="A developer cancels the jobs it submitted (403 for others'); an admin any job.")
    async def cancel_job(job_id: str, who: Principal = developer) -> dict[str, Any]:
        check_job_owner(await asyncio.to_thread(ctx.store.get_job, job_id), who)
        return await ctx.jobs.cancel(job_id, who.name)

    @api.post(
        "/v1/jobs/{job_id}/retry", response_model=JobView, tags=["jobs"], summary="Queue a failed or cancelled job again",
        description="The same job id and spec go back to the queue (attempts count up); a training job whose model "
        "was registered by an earlier attempt is not registered twice. 409 for a queued, running or succeeded job; "
        "403 when a developer retries a job it did not submit (an admin may retry any).",
    )
    async def retry_job(job_id: str, who: Principal = developer) -> dict[str, Any]:
        from app.errors import Conflict

        job = await asyncio.to_thread(ctx.store.get_job, job_id)
        check_job_owner(job, who)
        if job["status"] not in ("failed", "cancelled"):
            raise Conflict(f"job {job_id} is {job['status']}; only failed or cancelled jobs can be retried")
        out = await asyncio.to_thread(
            ctx.store.transition_job, job_id, "queued", actor=who.name, expect={"failed", "cancelled"}, error=None
        )
        await ctx.jobs.notify()
        return out

    # -- endpoints -------------------------------------------------------------------------
    @api.post("/v1/endpoints", status_code=201, tags=["serving"], summary="Create an endpoint")
    async def create_endpoint(body: EndpointCreate, who: Principal = developer) -> dict[str, Any]:
        _check_device(ctx, body.config)
        if body.spec.features is not None:  # the feature service exists and the spec fits it (422)
            await asyncio.to_thread(ctx.router.enricher.check, body.spec.features)
        check_endpoint_config(body.runtime, body.config, ctx.settings)
        resolved = await _resolve(ctx, body.target, use_cache=False)
        check_ensemble_target(resolved, body.config)
        # Stored under the model's guard, checking again that the target resolves: a delete of
        # the model racing this request either sees the endpoint or makes this one fail.
        row = await asyncio.to_thread(
            ctx.store.create_endpoint, body.name, body.target, body.runtime, body.config, who.name,
            model=parse_target(body.target).name, verify=lambda: ctx.registry.resolve(body.target, use_cache=False),
            spec=body.spec.model_dump(mode="json"),
        )
        await ctx.notify_endpoint_changed(body.name)  # a replica may hold the 404 of a name now taken
        return {**redacted_endpoint(row), "model_version": resolved.version}

    @api.get("/v1/endpoints", response_model=Page, tags=["serving"], summary="List endpoints")
    async def list_endpoints(
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, _: Principal = viewer
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(ctx.store.list_endpoints, limit=limit, page_token=page_token)
        return {"items": [redacted_endpoint(i) for i in items], "next_page_token": nxt}

    @api.get("/v1/endpoints/{name}", tags=["serving"], summary="An endpoint and the version it serves now")
    async def get_endpoint(name: str, _: Principal = viewer) -> dict[str, Any]:
        row = redacted_endpoint(await asyncio.to_thread(ctx.store.get_endpoint, name))
        try:
            resolved = await _resolve(ctx, row["target"])
            row["model_version"] = resolved.version
        except MatihError as exc:
            row["model_version"] = None
            row["resolve_error"] = redact(exc.message)
        return row

    @api.put("/v1/endpoints/{name}", tags=["serving"], summary="Change an endpoint (no redeploy)")
    async def update_endpoint(name: str, body: EndpointUpdate, who: Principal = developer) -> dict[str, Any]:
        _check_device(ctx, body.config or {})
        guard: dict[str, Any] = {}
        current: dict[str, Any] = {}
        if body.runtime is not None or body.config is not None:  # the runtime and config as they will be
            if body.runtime is None or body.config is None:
                current = await asyncio.to_thread(ctx.store.get_endpoint, name)
            runtime = body.runtime if body.runtime is not None else current["runtime"]
            config = body.config if body.config is not None else current["config"]
            check_endpoint_config(runtime, config, ctx.settings)
        if body.target is not None or (body.config or {}).get("ensemble"):  # target and config as they will be
            if (body.target is None or body.config is None) and not current:
                current = await asyncio.to_thread(ctx.store.get_endpoint, name)
            to_check = body.target if body.target is not None else current["target"]
            resolved = await _resolve(ctx, to_check, use_cache=False)
            check_ensemble_target(resolved, body.config if body.config is not None else current["config"])
        if body.target is not None:
            target = body.target
            guard = {"model": parse_target(target).name,
                     "verify": lambda: ctx.registry.resolve(target, use_cache=False)}
        changes = body.model_dump(exclude_unset=True)
        if body.spec is not None:
            if body.spec.features is not None:
                await asyncio.to_thread(ctx.router.enricher.check, body.spec.features)
            changes["spec"] = body.spec.model_dump(mode="json")
        row = await asyncio.to_thread(ctx.store.update_endpoint, name, changes, who.name, **guard)
        await ctx.notify_endpoint_changed(name)
        return redacted_endpoint(row)

    @api.delete("/v1/endpoints/{name}", status_code=204, tags=["serving"], summary="Delete an endpoint")
    async def delete_endpoint(name: str, who: Principal = developer) -> Response:
        await asyncio.to_thread(ctx.store.delete_endpoint, name, who.name)
        await ctx.notify_endpoint_changed(name)
        return Response(status_code=204)

    @api.post(
        "/v1/endpoints/{name}/predict", response_model=PredictResponse, tags=["serving"],
        summary="Predict with the endpoint's current model",
        description="The answer names the model version and variant that served it and the request id the "
        "server issued (also in the `X-Request-Id` header); a client's own `X-Request-Id` comes back as "
        "`client_request_id`. Feedback for the prediction (`POST /v1/endpoints/{name}/feedback`) names that "
        "request id. The prediction log records the request as the endpoint's `spec.logging` says.",
    )
    async def predict(
        body: PredictRequest, request: Request, name: str = Path(...), who: Principal = predictor,
        explain: str | None = Query(None, description="`members`: an ensemble's answer also lists each member's "
                                    "output, weight and latency (also a body field)."),
    ) -> JSONResponse:
        started, arrived = time.perf_counter(), time.time()
        request_id, client_id, issued_here = ids_of(request.headers)
        explained = wants_explain(explain) or wants_explain(body.explain)
        asked: list[str] = []

        def sticky(key: str) -> str | None:  # the plan's sticky key: the header, else the body field
            asked.append(key)
            return request.headers.get(STICKY_HEADER) or body.sticky_value(key)

        plan = await ctx.router.plan(name, sticky)
        extra = body.unknown_fields(None)
        unknown = body.unknown_fields(asked[0] if asked else None)
        if unknown:
            raise InvalidInput(
                f"{unknown[0]}: unknown field (a request may add one field beside instances/inputs: the sticky key "
                f"of the endpoint's traffic plan, which {'is ' + repr(asked[0]) if asked else 'has none'})",
                details={"field": unknown[0]},
            )
        info = RequestInfo(request_id, client_id, who.name, "rest", started, arrived)
        payload = body.model_dump(exclude_none=True, exclude={"explain", *extra})
        done = await ctx.router.predict(plan, payload, info, explained)
        model = done.leg.model
        content = {
            "predictions": done.output["predictions"],
            "model": model.name,
            "model_version": model.version,
            "endpoint": name,
            "variant": done.leg.variant or None,
            "request_id": request_id,
        }
        if client_id is not None:
            content["client_request_id"] = client_id
        if "probabilities" in done.output:
            content["probabilities"] = done.output["probabilities"]
        for key in ("degraded", "failed", "members"):  # an ensemble's (app.ensembles.serving)
            if key in done.output:
                content[key] = done.output[key]
        if done.features is not None:  # an enriching endpoint's stale and missing stored features
            content["features"] = done.features
        # Serve's ingress echoes the request's x-request-id, which the request-id middleware set
        # to ours; without the middleware the header is set here.
        headers = {"X-Request-Id": request_id} if issued_here else {}
        if done.leg.variant:
            headers[VARIANT_HEADER] = done.leg.variant
        return JSONResponse(content, headers=headers or None)

    # -- audit -----------------------------------------------------------------------------
    @api.get("/v1/audit", response_model=Page, tags=["governance"], summary="The audit log (admin)")
    async def audit(
        limit: int = Query(100, ge=1, le=1000), page_token: str | None = None, resource_type: str | None = None,
        _: Principal = admin,
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(
            ctx.store.list_audit, limit=limit, page_token=page_token, resource_type=resource_type
        )
        return {"items": items, "next_page_token": nxt}

    for path in ROUTERS:
        module, _, func = path.partition(":")
        api.include_router(getattr(importlib.import_module(module), func)(ctx))
    # Starlette tries the routes in order (and so does Serve, to name each request's route):
    # the prediction routes, which take nearly every request, go first. No other route matches
    # their paths, so the order changes nothing else (a stable sort).
    api.router.routes.sort(key=_route_rank)
    for route in api.router.routes:  # and first within an included router (FastAPI keeps them nested)
        router = getattr(route, "original_router", None)
        if router is not None:
            router.routes.sort(key=_route_rank)
    return api


# The prediction routes (REST and V2), tried before the others.
HOT_ROUTES = frozenset({"/v1/endpoints/{name}/predict", "/v2/models/{model}/infer"})


def _route_rank(route) -> int:
    """0: a prediction route; 1: an included router that holds one; 2: any other route."""
    if getattr(route, "path", None) in HOT_ROUTES:
        return 0
    router = getattr(route, "original_router", None)
    if router is not None and any(getattr(r, "path", None) in HOT_ROUTES for r in router.routes):
        return 1
    return 2


def role_dependencies(ctx: ApiContext):
    """FastAPI dependencies (viewer, predictor, developer, admin): each authenticates the bearer
    token and requires at least that role, returning the :class:`Principal`."""

    def require(role: Role):
        async def dependency(request: Request) -> Principal:
            principal = await ctx.authenticator.authenticate(request.headers.get("authorization"))
            principal.require(role)
            return principal

        return dependency

    return tuple(Depends(require(r)) for r in Role)


def check_job_owner(job: dict[str, Any], who: Principal) -> None:
    """A job belongs to the principal that submitted it (``created_by``): a developer cancels or
    retries only its own jobs, an admin any. Raises PermissionDenied (403) otherwise."""
    if who.role >= Role.admin or job.get("created_by") == who.name:
        return
    raise PermissionDenied(
        f"job {job['job_id']} was submitted by {job.get('created_by')!r}; {who.name} (role {who.role.name}) may "
        "cancel or retry only its own jobs, an admin any",
        details={"job_id": job["job_id"], "owner": job.get("created_by")},
    )


# Routers of further domains: "module:function", each function taking (ctx) -> APIRouter.
ROUTERS: list[str] = [
    "app.api.registry:router",
    "app.api.training:router",
    "app.api.ensembles:router",
    "app.api.gpus:router",
    "app.api.batch:router",
    "app.api.v2:router",
    "app.api.feedback:router",
    "app.api.events:router",
    "app.api.predlog:router",
    "app.api.traffic:router",
    "app.api.abtests:router",
    "app.api.rollouts:router",
    "app.api.features:router",
    "app.api.features_online:router",
    "app.api.features_jobs:router",
    "app.api.features_push:router",
    "app.api.monitors:router",
    "app.api.alerts:router",
]


async def _resolve(ctx: ApiContext, target: str, use_cache: bool = True) -> ResolvedModel:
    ref = parse_target(target)  # a malformed target is the caller's 422 before any MLflow call
    if ctx.resolver is not None:
        model = await ctx.resolver.resolve(ref, use_cache=use_cache)
    else:
        model = await asyncio.to_thread(ctx.registry.resolve, ref, use_cache=use_cache)
    check_servable(model)
    return model


def _check_device(ctx: ApiContext, config: dict[str, Any]) -> None:
    device = config.get("device", "cpu")
    if device not in ("cpu", "gpu"):
        raise InvalidInput(f"config.device {device!r} must be 'cpu' or 'gpu'", details={"field": "config.device"})
    if device == "gpu" and not ctx.gpu_pool:
        raise InvalidInput(
            "config.device 'gpu': this Ray cluster has no GPUs, so there is no GPU pool; omit device or use 'cpu'",
            details={"field": "config.device"},
        )
