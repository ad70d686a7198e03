"""The Open Inference Protocol (KServe V2) routes, so tritonclient and KServe clients can talk
to the platform as they would to a Triton or KServe server.

``{model}`` names an endpoint or a registered model. Without a version, an endpoint of that
name wins (its target, runtime and config serve the request); otherwise the registered model
``{model}@champion`` serves. With ``/versions/{v}``, ``{model}`` is always a registered model
and ``{model}/{v}`` serves in the default runtime. Bodies and the binary tensor extension are
handled by :mod:`app.serving.v2_codec`; every malformed request is a 400 ``{"error": ...}``.
The protocol functions (:func:`infer`, :func:`model_metadata`, ...) serve the gRPC form of the
protocol as well (``app/api/v2_grpc.py``): one code path, two transports.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app import __version__
from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.errors import (
    BadRequest,
    DependencyUnavailable,
    InvalidInput,
    MatihError,
)
from app.ensembles.serving import definition_of, members_json, wants_explain
from app.names import parse_version
from app.registry.mlflow_registry import model_metadata as version_metadata
from app.serving import v2_codec
from app.serving.request_ids import ids_of
from app.serving.routing import Plan, RequestInfo
from app.traffic.spec import STICKY_HEADER, VARIANT_HEADER

# The input name skl2onnx gives every model the platform trains; requests may use any name.
INPUT_NAME = "X"
PLATFORMS = {"onnx": "onnxruntime_onnx", "triton": "triton", "native": "matih_native"}
# What serving needs; the job scheduler and MLflow (last known good) may be down meanwhile.
_SERVING_DEPENDENCIES = ("ray", "registry_cache")


def _label_output(task: str | None) -> str:
    """skl2onnx's name for the prediction output: ``variable`` for regressors, else ``label``."""
    return "variable" if task == "regression" else "label"


def _model_metadata(name: str, plan: Plan) -> dict[str, Any]:
    served = plan.primary
    meta = version_metadata(served.model)
    features = meta.get("feature_names")
    n = len(features) if features else -1
    task = meta.get("task")
    classes = meta.get("classes")
    if task == "regression":
        outputs = [{"name": "variable", "datatype": "FP32", "shape": [-1]}]
    else:
        label_type = "BYTES" if classes and any(isinstance(c, str) for c in classes) else "INT64"
        outputs = [
            {"name": "label", "datatype": label_type, "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes) if classes else -1]},
        ]
    body: dict[str, Any] = {
        "name": name,
        "versions": [served.model.version],
        "platform": PLATFORMS.get(served.runtime, served.runtime),
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, n]}],
        "outputs": outputs,
    }
    extra = {"model": served.model.name, "model_version": served.model.version}
    if plan.endpoint:
        extra["endpoint"] = plan.name
    if features:
        extra["feature_names"] = features
    body["parameters"] = extra
    return body


# -- the protocol, for both transports: the REST routes below and gRPC (app/api/v2_grpc.py) ----
async def server_ready(ctx: ApiContext) -> None:
    """Returns when the metadata store and the serving path answer; raises
    DependencyUnavailable naming each one that does not."""
    checks = {"metadata_store": lambda: asyncio.to_thread(ctx.store.ping)}
    checks.update({n: ctx.readiness[n] for n in _SERVING_DEPENDENCIES if n in ctx.readiness})
    results = await asyncio.gather(*(asyncio.wait_for(c(), 5) for c in checks.values()), return_exceptions=True)
    down = [
        f"{n}: {r.message if isinstance(r, MatihError) else (str(r) or type(r).__name__)}"
        for n, r in zip(checks, results)
        if isinstance(r, BaseException)
    ]
    if down:
        raise DependencyUnavailable("not ready: " + "; ".join(down))


def server_metadata() -> dict[str, Any]:
    return {"name": "matih-ml", "version": __version__, "extensions": ["binary_tensor_data"]}


async def model_metadata(ctx: ApiContext, name: str, version: str | None = None) -> dict[str, Any]:
    """The V2 model metadata of ``name`` (an endpoint, else a registered model; see the module docstring)."""
    return _model_metadata(name, await ctx.router.v2_plan(name, version))


async def model_ready(ctx: ApiContext, name: str, version: str | None = None) -> None:
    """Returns when ``name`` resolves to a servable version; raises NotFound otherwise."""
    await ctx.router.v2_plan(name, version)


@dataclass
class Inference:
    """What an infer request produced: the version that served it and ``(name, array, binary)``
    per output asked for, ready for :func:`v2_codec.encode_response` or its gRPC twin."""

    model_version: str
    outputs: list[tuple[str, Any, bool]]
    # Response parameters beyond the request id: an ensemble's "degraded" ("true") and, with
    # parameters.explain "members", "members" (JSON text: V2 parameters hold scalars only).
    parameters: dict[str, str] = field(default_factory=dict)


async def infer(
    ctx: ApiContext, name: str, version: str | None, req: v2_codec.InferRequest, info: RequestInfo,
    sticky_header: str | None = None,
) -> Inference:
    """Run a decoded infer request through the endpoint (or registered model) ``name``
    (the one predict path: :class:`app.serving.routing.EndpointRouter`). The sticky key of an
    endpoint's traffic plan comes from ``sticky_header`` (X-Matih-Sticky, or the gRPC metadata
    x-matih-sticky), else from the request parameter named by the plan's ``sticky.key``; the
    variant that served is the response parameter ``variant``."""

    def sticky(key: str) -> str | None:
        value = sticky_header or req.parameters.get(key)
        return None if value is None else str(value)

    payload = v2_codec.model_payload(req)
    try:
        explain = wants_explain(req.parameters.get("explain"))
    except InvalidInput as exc:  # the protocol answers every bad request with 400
        raise BadRequest(exc.message, details={"field": "parameters.explain"}) from None
    plan = await ctx.router.v2_plan(name, version, sticky)
    served = plan.primary
    task = ctx.router.task_and_features(served.model)[0]
    if task is None and plan.combine == "ensemble":
        task = definition_of(served.model).task
    label = _label_output(task)
    known = [label] if task == "regression" else [label, "probabilities"]
    if req.outputs is not None:
        for o in req.outputs:
            if o.name not in known:
                raise BadRequest(
                    f"output {o.name!r} is not an output of model {name!r}; it has {', '.join(known)}",
                    details={"field": "outputs", "output": o.name},
                )
    payload["return_probabilities"] = (
        task != "regression" if req.outputs is None else any(o.name == "probabilities" for o in req.outputs)
    )
    try:
        done = await ctx.router.predict(plan, payload, info, explain)
        result = done.output
    except InvalidInput as exc:  # the protocol answers every bad request with 400
        cause = getattr(exc, "cause", None)  # raised in a replica: Ray's wrapper holds the original
        original = cause if isinstance(cause, InvalidInput) else exc
        raise BadRequest(original.message, details=original.details) from None
    outputs = v2_codec.select_outputs(
        v2_codec.prediction_tensors({k: result[k] for k in ("predictions", "probabilities") if k in result}, label), req
    )
    parameters = {"variant": served.variant} if served.variant else {}
    if result.get("degraded"):
        parameters["degraded"] = "true"
        parameters["failed"] = members_json(result.get("failed", []))
    if "members" in result:
        parameters["members"] = members_json(result["members"])
    if done.features is not None:  # an enriching endpoint's stale and missing stored features (JSON)
        parameters["features"] = json.dumps(done.features, separators=(",", ":"))
    return Inference(served.model.version, outputs, parameters)


async def _infer(ctx: ApiContext, name: str, version: str | None, request: Request, who: Principal) -> Response:
    started, arrived = time.perf_counter(), time.time()
    if version is not None:
        parse_version(version)  # the path before the body: a bad URL needs no body read
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise BadRequest(
            f"Content-Encoding {encoding!r} is not supported; send the request uncompressed",
            details={"field": "Content-Encoding"},
        )
    body = await request.body()
    req = v2_codec.decode_request(body, request.headers.get(v2_codec.HEADER_LENGTH))
    request_id, client_id, issued_here = ids_of(request.headers)
    if req.id is not None:  # the protocol's own request id is the client's
        client_id = req.id
    done = await infer(ctx, name, version, req, RequestInfo(request_id, client_id, who.name, "v2", started, arrived),
                       request.headers.get(STICKY_HEADER))
    # The protocol echoes a request's "id"; the server's id is in the X-Request-Id header and in
    # the response's parameters.request_id.
    content, header_length = v2_codec.encode_response(
        name, done.model_version, client_id if req.id is not None else request_id, done.outputs,
        parameters={"request_id": request_id, **done.parameters},
    )
    headers = {"X-Request-Id": request_id} if issued_here else {}
    if "variant" in done.parameters:
        headers[VARIANT_HEADER] = done.parameters["variant"]
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[v2_codec.HEADER_LENGTH] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


def router(ctx: ApiContext) -> APIRouter:
    viewer, predictor, _, _ = role_dependencies(ctx)
    api = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

    @api.get("/health/live", summary="Server liveness (V2); no auth")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @api.get("/health/ready", summary="Server readiness (V2): metadata store and serving path; no auth")
    async def ready() -> dict[str, bool]:
        await server_ready(ctx)
        return {"ready": True}

    @api.get("", summary="Server metadata (V2)", name="server_metadata")
    async def server_metadata_route(_: Principal = viewer) -> dict[str, Any]:
        return server_metadata()

    @api.get("/models/{model}", summary="Model metadata (V2): an endpoint, else the registered model's champion",
             name="model_metadata")
    async def model_metadata_route(model: str, _: Principal = viewer) -> dict[str, Any]:
        return await model_metadata(ctx, model)

    @api.get("/models/{model}/versions/{version}", summary="Metadata of a registered model version (V2)")
    async def version_metadata_route(model: str, version: str, _: Principal = viewer) -> dict[str, Any]:
        return await model_metadata(ctx, model, version)

    @api.get("/models/{model}/ready", summary="Model readiness (V2): the name resolves to a servable version",
             name="model_ready")
    async def model_ready_route(model: str, _: Principal = viewer) -> dict[str, Any]:
        await model_ready(ctx, model)
        return {"name": model, "ready": True}

    @api.get("/models/{model}/versions/{version}/ready", summary="Readiness of a registered model version (V2)")
    async def version_ready(model: str, version: str, _: Principal = viewer) -> dict[str, Any]:
        await model_ready(ctx, model, version)
        return {"name": model, "ready": True}

    infer_doc = {
        "requestBody": {
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "A V2 inference request; binary tensor data after the JSON header when "
            "Inference-Header-Content-Length is set.",
        }
    }

    @api.post("/models/{model}/infer", summary="Inference (V2), JSON or binary tensors", openapi_extra=infer_doc)
    async def infer(model: str, request: Request, who: Principal = predictor) -> Response:
        return await _infer(ctx, model, None, request, who)

    @api.post(
        "/models/{model}/versions/{version}/infer", summary="Inference with a registered model version (V2)",
        openapi_extra=infer_doc,
    )
    async def infer_version(model: str, version: str, request: Request, who: Principal = predictor) -> Response:
        return await _infer(ctx, model, version, request, who)

    return api

