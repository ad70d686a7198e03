"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` (the KServe V2
proto), so that ``tritonclient.grpc`` and KServe's gRPC clients work against the platform.

Serve's gRPC proxy (``grpc_options`` in serve_config.yaml, port 9000) hands each call to the
Gateway method named like the RPC (``Gateway.ModelInfer``), which calls the method of the same
name here with the request message and Serve's ``grpc_context``. Everything below the
transport is the REST V2 routes' (``app/api/v2.py``): the same model names (an endpoint, else
a registered model's champion; ``model_version`` names a registered version), the same
decoder, the same inference path. Auth is the same bearer token, in the ``authorization``
metadata key; errors are gRPC status codes from ``app.api.errors.GRPC_STATUS_BY_ERROR``, with
the error's message as the details.

Implemented: ServerLive, ServerReady (no token needed, as over REST), ServerMetadata,
ModelMetadata, ModelReady (viewer) and ModelInfer (predictor). The other unary RPCs of the
service (model config and repository, shared memory, statistics, settings) answer
UNIMPLEMENTED; the streaming ModelStreamInfer is not routed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app.api import v2
from app.api.app import ApiContext
from app.api.deadline import deadline_s
from app.api.errors import grpc_status
from app.auth import Principal, Role
from app.errors import MatihError, NotFound, PayloadTooLarge, RequestTimeout
from app.names import parse_version
from app.predlog.ids import new_request_id
from app.serving import v2_proto
from app.serving.routing import RequestInfo

log = logging.getLogger(__name__)

# The servicer function Serve's gRPC proxy registers (grpc_options.grpc_servicer_functions).
SERVICER_FUNCTION = "app.serving.v2_proto.add_servicer_to_server"
# The RPCs served, each a method of the same name here and on the Gateway.
METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelMetadata", "ModelReady", "ModelInfer")
# The service's other unary RPCs: methods here and on the Gateway too, answering UNIMPLEMENTED
# (without one, Serve answers a call to a method the ingress lacks with INTERNAL).
UNIMPLEMENTED = tuple(m for m in v2_proto.UNARY_METHODS if m not in METHODS)
UNARY_RPCS = METHODS + UNIMPLEMENTED


def _metadata(context: Any) -> dict[str, str]:
    if context is None:
        return {}
    return {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The GRPCInferenceService methods on an :class:`ApiContext` (the generated base class
    answers UNIMPLEMENTED for the others). ``context`` is the call's
    ``grpc.ServicerContext`` or Serve's ``RayServegRPCContext`` (None: no metadata, no status
    to set, as in a unit test). A failed call sets the status code and details on it and
    answers the RPC's empty response message."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def _call(
        self, context: Any, empty: Callable[[], Any], work: Callable[[dict[str, str]], Awaitable[Any]]
    ) -> Any:
        metadata = _metadata(context)
        limit = deadline_s([], self.ctx.settings.http.request_timeout_s)
        try:
            try:
                return await asyncio.wait_for(work(metadata), limit)
            except TimeoutError:
                raise RequestTimeout(
                    f"the request did not finish within {limit:g} s (http.request_timeout_s)",
                    details={"timeout_s": limit},
                ) from None
        except MatihError as exc:
            code, details = grpc_status(exc)
        except Exception:  # noqa: BLE001 - any other failure is ours, not the caller's: logged, not shown
            log.exception("unhandled error in the gRPC inference service")
            code, details = grpc.StatusCode.INTERNAL, "internal_error: internal error; see the gateway logs"
        if context is not None:
            context.set_code(code)
            context.set_details(details)
        return empty()

    async def _authorize(self, metadata: dict[str, str], role: Role) -> Principal:
        principal = await self.ctx.authenticator.authenticate(metadata.get("authorization"))
        principal.require(role)
        return principal

    # -- the RPCs ------------------------------------------------------------------------------
    # Each RPC takes its request message or, as Serve hands it on, the message's bytes.
    async def ServerLive(self, request: Any, context: Any = None) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any = None) -> pb.ServerReadyResponse:
        """``ready: false`` (status OK) while a dependency of serving is down, as Triton answers;
        the reasons are in the Gateway's log and in ``GET /ready``."""

        async def work(_: dict[str, str]) -> pb.ServerReadyResponse:
            try:
                await v2.server_ready(self.ctx)
            except MatihError as exc:
                log.warning("gRPC ServerReady: %s", exc.message)
                return pb.ServerReadyResponse(ready=False)
            return pb.ServerReadyResponse(ready=True)

        return await self._call(context, pb.ServerReadyResponse, work)

    async def ServerMetadata(self, request: Any, context: Any = None) -> pb.ServerMetadataResponse:
        async def work(metadata: dict[str, str]) -> pb.ServerMetadataResponse:
            await self._authorize(metadata, Role.viewer)
            return v2_proto.server_metadata_response(v2.server_metadata())

        return await self._call(context, pb.ServerMetadataResponse, work)

    async def ModelMetadata(self, request: Any, context: Any = None) -> pb.ModelMetadataResponse:
        async def work(metadata: dict[str, str]) -> pb.ModelMetadataResponse:
            await self._authorize(metadata, Role.viewer)
            msg = v2_proto.parse(request, pb.ModelMetadataRequest)
            meta = await v2.model_metadata(self.ctx, msg.name, _version(msg.version))
            return v2_proto.model_metadata_response(meta)

        return await self._call(context, pb.ModelMetadataResponse, work)

    async def ModelReady(self, request: Any, context: Any = None) -> pb.ModelReadyResponse:
        """``ready: false`` for a name that resolves to no servable version (REST answers 404,
        which tritonclient.http reads as not ready); other errors are statuses."""

        async def work(metadata: dict[str, str]) -> pb.ModelReadyResponse:
            await self._authorize(metadata, Role.viewer)
            msg = v2_proto.parse(request, pb.ModelReadyRequest)
            try:
                await v2.model_ready(self.ctx, msg.name, _version(msg.version))
            except NotFound:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._call(context, pb.ModelReadyResponse, work)

    async def ModelInfer(self, request: Any, context: Any = None) -> pb.ModelInferResponse:
        started, arrived = time.perf_counter(), time.time()

        async def work(metadata: dict[str, str]) -> pb.ModelInferResponse:
            who = await self._authorize(metadata, Role.predictor)
            limit = self.ctx.settings.http.max_body_bytes  # Serve's gRPC proxy takes messages up to 2 GiB
            size = len(request) if isinstance(request, (bytes, bytearray)) else request.ByteSize()
            if size > limit:
                raise PayloadTooLarge(
                    f"the request message has {size} bytes; at most {limit} (the setting http.max_body_bytes)",
                    details={"limit": limit},
                )
            msg = v2_proto.parse(request, pb.ModelInferRequest)
            version = _version(msg.model_version)
            req = v2_proto.decode_infer_request(msg)
            request_id = new_request_id()
            client_id = req.id if req.id is not None else metadata.get("x-request-id")
            info = RequestInfo(request_id, client_id, who.name, "grpc", started, arrived)
            done = await v2.infer(self.ctx, msg.model_name, version, req, info, metadata.get("x-matih-sticky"))
            # The protocol echoes the request's id; the server's is the parameter request_id.
            return v2_proto.encode_infer_response(
                msg.model_name, done.model_version, req.id if req.id is not None else request_id, done.outputs,
                parameters={"request_id": request_id, **done.parameters},
            )

        return await self._call(context, pb.ModelInferResponse, work)


def _version(version: str) -> str | None:
    """A request's version field: empty is none (the endpoint, or the champion)."""
    if not version:
        return None
    parse_version(version)
    return version


def _unimplemented(name: str, response: type) -> Callable[..., Awaitable[Any]]:
    async def method(self: InferenceService, request: Any, context: Any = None) -> Any:
        if context is not None:
            context.set_code(grpc.StatusCode.UNIMPLEMENTED)
            context.set_details(f"unimplemented: {name} is not served here; the served RPCs are {', '.join(METHODS)}")
        return response()

    method.__name__ = method.__qualname__ = name
    return method


# The generated base class's own versions raise NotImplementedError, which Serve logs as a
# replica failure with a traceback: these answer the status alone.
for _m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _m.name in UNIMPLEMENTED:
        setattr(InferenceService, _m.name, _unimplemented(_m.name, getattr(pb, _m.output_type.name)))
