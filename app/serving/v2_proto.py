"""The Open Inference Protocol's gRPC messages (``inference.GRPCInferenceService``, the KServe V2
proto) to and from the forms :mod:`app.serving.v2_codec` works with, so that REST and gRPC
requests go through one decoder and one inference path (``app/api/v2.py``).

The message classes are tritonclient's generated ``tritonclient.grpc.service_pb2``: the proto
is KServe's, and tritonclient ships it compiled. Plain Python, unit-testable without a server.

:func:`add_servicer_to_server` is the servicer function Serve's gRPC proxy registers
(``grpc_options.grpc_servicer_functions``) in place of tritonclient's generated
``add_GRPCInferenceServiceServicer_to_server``: it registers the same service and methods, but
hands each request on as the bytes that came over the wire. Serve pickles the request from
its proxy to the ingress replica, and tritonclient's message classes cannot be pickled (they
are built under the module name ``grpc_service_pb2``, which does not exist); bytes can, and
the replica parses each request once (:func:`parse`).

An input's values come either as ``raw_input_contents`` (one little-endian byte string per
input, in input order, what tritonclient sends) or in the typed ``contents`` fields; both
become the V2 dict form and go through :func:`v2_codec.decode_document`. Outputs always go
back as ``raw_output_contents``, as Triton answers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from app.errors import BadRequest
from app.serving import v2_codec

SERVICE = "inference.GRPCInferenceService"
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Only the unary RPCs are registered: gRPC itself answers the streaming ModelStreamInfer UNIMPLEMENTED.
UNARY_METHODS: tuple[str, ...] = tuple(
    m.name for m in _SERVICE.methods if not (m.client_streaming or m.server_streaming)
)

M = TypeVar("M")


def add_servicer_to_server(servicer: Any, server: grpc.Server) -> None:
    """Register ``servicer``'s unary GRPCInferenceService methods on ``server``; each receives
    the request as bytes (see the module docstring) and returns the response message."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=None,  # the bytes as they came
            response_serializer=getattr(pb, _SERVICE.methods_by_name[name].output_type.name).SerializeToString,
        )
        for name in UNARY_METHODS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62
        server.add_registered_method_handlers(SERVICE, handlers)


def parse(request: bytes | M, message: type[M]) -> M:
    """The request message of ``message``'s type, from its bytes (or as it is, already parsed)."""
    if isinstance(request, (bytes, bytearray, memoryview)):
        try:
            return message.FromString(bytes(request))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, whichever implementation raises it
            raise BadRequest(f"the request is not a valid {message.__name__} message", details={"field": "body"}) from None
    return request


# The typed field of InferTensorContents that holds each datatype (KServe's predict_v2.proto).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(param: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (a oneof of bool, int64, uint64, double, string)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def parameters_dict(params) -> dict[str, Any]:
    return {k: parameter_value(v) for k, v in params.items()}


def request_document(request: pb.ModelInferRequest) -> tuple[dict[str, Any], bytes | None]:
    """A ModelInferRequest as the V2 dict form and the binary data after it (None: none), the
    two arguments of :func:`v2_codec.decode_document`."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one raw "
            "content per input, in input order (or none, and the values in each input's contents)",
            details={"field": "raw_input_contents"},
        )
    inputs = []
    for i, t in enumerate(request.inputs):
        params = parameters_dict(t.parameters)
        params.pop("binary_data_size", None)  # the HTTP extension's: set below from the raw content
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if raw:
            if t.HasField("contents") and t.contents.ByteSize():
                raise BadRequest(
                    f"input {t.name!r} has both contents and raw_input_contents; send one",
                    details={"field": f"inputs[{i}]"},
                )
            params["binary_data_size"] = len(raw[i])
        else:
            entry["data"] = _typed_contents(t, i)
        entry["parameters"] = params
        inputs.append(entry)
    doc: dict[str, Any] = {"inputs": inputs, "parameters": parameters_dict(request.parameters)}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [{"name": o.name, "parameters": parameters_dict(o.parameters)} for o in request.outputs]
        for o in doc["outputs"]:
            o["parameters"].pop("binary_data", None)  # gRPC outputs are always raw bytes
    return doc, (b"".join(raw) if raw else None)


def _typed_contents(t: pb.ModelInferRequest.InferInputTensor, i: int) -> list[Any]:
    field = _CONTENTS_FIELD.get(t.datatype)
    if field is None:
        if t.datatype in v2_codec.DATATYPES:  # FP16: the proto has no typed field for it
            raise BadRequest(
                f"input {t.name!r} is {t.datatype}, which has no typed contents field; send it as raw_input_contents",
                details={"field": f"inputs[{i}].contents"},
            )
        return []  # an unknown datatype: the decoder names it and the accepted ones
    values = list(getattr(t.contents, field))
    if t.datatype == "BYTES":
        try:
            return [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise BadRequest(
                f"input {t.name!r}: BYTES contents must be UTF-8 text (send other bytes as raw_input_contents)",
                details={"field": f"inputs[{i}].contents"},
            ) from None
    return values


def decode_infer_request(request: pb.ModelInferRequest) -> v2_codec.InferRequest:
    """A ModelInferRequest as the decoded request the V2 inference path takes; every malformed
    request raises BadRequest, as over REST."""
    doc, rest = request_document(request)
    return v2_codec.decode_document(doc, rest)


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
    parameters: dict[str, str] | None = None,
) -> pb.ModelInferResponse:
    """The ModelInferResponse of ``(name, array, _)`` outputs (``v2_codec.select_outputs``),
    every output as raw bytes (the binary flag is the HTTP extension's and does not apply);
    ``parameters``: string parameters of the response (the server's request id)."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=str(model_version or ""), id=request_id or "")
    for key, value in (parameters or {}).items():
        response.parameters[key].string_param = value
    for name, arr, _ in outputs:
        datatype = v2_codec.datatype_of(arr)
        response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        response.raw_output_contents.append(v2_codec.to_binary(arr, datatype))
    return response


def server_metadata_response(meta: dict[str, Any]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta.get("extensions", []))


def model_metadata_response(meta: dict[str, Any]) -> pb.ModelMetadataResponse:
    """The V2 model metadata dict (``app/api/v2.py``) as the proto; ``parameters`` (the
    registered model and endpoint) has no field there and stays out."""

    def tensors(items: list[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                for t in items]

    return pb.ModelMetadataResponse(
        name=meta["name"],
        versions=[str(v) for v in meta.get("versions", [])],
        platform=meta.get("platform", ""),
        inputs=tensors(meta.get("inputs", [])),
        outputs=tensors(meta.get("outputs", [])),
    )
