"""The Open Inference Protocol (KServe V2) tensor codec: request bodies in, response bodies out.

Pure Python and numpy, so the Gateway routes (``app/api/v2.py``) stay thin and every rule
here is unit-testable. Two wire forms are understood:

* JSON: ``{"id"?, "inputs": [{"name", "datatype", "shape", "data"}], "outputs"?: [...],
  "parameters"?}`` where ``data`` is a flat or nested list in row-major order;
* the binary tensor extension (what tritonclient sends by default): the header
  ``Inference-Header-Content-Length: N``, the first N bytes of the body are the JSON above,
  then the raw bytes of each input whose ``parameters.binary_data_size`` is set, in input
  order (little-endian; BOOL one byte each; BYTES as 4-byte length + bytes per element).

Responses are encoded the same way: outputs asked for with ``parameters.binary_data: true``
(or all of them, with the request parameter ``binary_data_output: true``) travel as raw bytes
after the JSON header. Every malformed request raises :class:`app.errors.BadRequest` naming
the input and the problem, since the protocol answers bad requests with 400.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor, triton_to_np_dtype

from app.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"

# The datatypes accepted, each mapped to numpy by tritonclient.utils.triton_to_np_dtype. The list
# is ours because tritonclient.utils has none; BF16 (ml_dtypes.bfloat16 there) is left out: the
# models served take FP32, and refusing it with a hint beats a lossy guess.
DATATYPES: tuple[str, ...] = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES",
)
NUMERIC = frozenset(DATATYPES) - {"BOOL", "BYTES"}


def _dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a V2 datatype, little-endian as on the wire (tritonclient's is native)."""
    return np.dtype(triton_to_np_dtype(datatype)).newbyteorder("<")


@dataclass
class Tensor:
    """A decoded input tensor (or an output to encode): ``data`` already has ``shape``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's binary_data_output


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None  # None: every output of the model
    id: str | None = None
    binary_data_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


# -- decoding ----------------------------------------------------------------------------------
def decode_request(body: bytes, header_length: str | int | None = None) -> InferRequest:
    """Parse an infer request body; ``header_length`` is the ``Inference-Header-Content-Length``
    header when the client sent one (binary tensor extension)."""
    if header_length is not None:
        n = _header_length(header_length, len(body))
        head, rest = body[:n], memoryview(body)[n:]
    else:
        head, rest = body, None
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        where = f"the first {len(head)} bytes (Inference-Header-Content-Length)" if rest is not None else "the body"
        raise BadRequest(f"the inference request is not valid JSON: {where}: {exc}", details={"field": "body"}) from None
    return decode_document(doc, rest)


def decode_document(doc: Any, rest: bytes | memoryview | None = None) -> InferRequest:
    """An infer request in its dict form (the parsed JSON) with ``rest``, the binary tensor
    data that follows the JSON header (None: no binary data). The gRPC form
    (``app/serving/v2_proto.py``) comes here too, so both protocols check inputs alike."""
    if not isinstance(doc, dict):
        raise BadRequest("the inference request must be a JSON object with 'inputs'", details={"field": "body"})
    if rest is not None and not isinstance(rest, memoryview):
        rest = memoryview(rest)

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, not {request_id!r}", details={"field": "id"})
    parameters = _parameters(doc.get("parameters"), "parameters")
    binary_out = parameters.get("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise BadRequest("parameters.binary_data_output must be true or false", details={"field": "parameters"})

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("the inference request needs 'inputs': a non-empty list of tensors", details={"field": "inputs"})
    inputs: list[Tensor] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        tensor, size = _decode_input(raw, i, rest, offset)
        if any(t.name == tensor.name for t in inputs):
            raise BadRequest(f"input {tensor.name!r} is given twice", details={"field": f"inputs[{i}].name"})
        inputs.append(tensor)
        offset += size
    if rest is not None and offset != len(rest):
        raise BadRequest(
            f"the body has {len(rest)} bytes after the JSON header but the inputs' binary_data_size add up to "
            f"{offset}; check Inference-Header-Content-Length and each binary_data_size",
            details={"field": "body"},
        )
    return InferRequest(
        inputs=inputs,
        outputs=_decode_outputs(doc.get("outputs")),
        id=request_id,
        binary_data_output=binary_out,
        parameters=parameters,
    )


def _header_length(value: str | int, body_len: int) -> int:
    text = str(value).strip()
    if not text.isdigit():
        raise BadRequest(
            f"{HEADER_LENGTH} is {value!r}; it must be the byte length of the JSON part of the body",
            details={"field": HEADER_LENGTH},
        )
    n = int(text)
    if n == 0 or n > body_len:
        raise BadRequest(
            f"{HEADER_LENGTH} is {n} but the body has {body_len} bytes; it must be the byte length of the "
            "JSON part, which comes first",
            details={"field": HEADER_LENGTH},
        )
    return n


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object", details={"field": where})
    return value


def _decode_input(raw: Any, i: int, rest: memoryview | None, offset: int) -> tuple[Tensor, int]:
    where = f"inputs[{i}]"
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object with name, datatype, shape and data", details={"field": where})
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where} needs a 'name'", details={"field": f"{where}.name"})
    label = f"input {name!r}"
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        hint = "; BF16 is not supported, send FP32" if datatype == "BF16" else ""
        raise BadRequest(
            f"{label} has datatype {datatype!r}; use one of {', '.join(DATATYPES)}{hint}",
            details={"field": f"{where}.datatype"},
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(
            f"{label} has shape {shape!r}; it must be a list of non-negative integers, e.g. [1, 4]",
            details={"field": f"{where}.shape"},
        )
    count = math.prod(shape)
    params = _parameters(raw.get("parameters"), f"{where}.parameters")
    size = params.get("binary_data_size")
    has_data = "data" in raw
    if size is None:
        if not has_data:
            raise BadRequest(
                f"{label} has no 'data' (or parameters.binary_data_size for binary data)",
                details={"field": f"{where}.data"},
            )
        return Tensor(name, datatype, shape, _from_json(raw["data"], datatype, shape, count, label, where)), 0
    if has_data:
        raise BadRequest(f"{label} has both 'data' and binary_data_size; send one", details={"field": where})
    if rest is None:
        raise BadRequest(
            f"{label} has binary_data_size but the request has no {HEADER_LENGTH} header",
            details={"field": HEADER_LENGTH},
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(
            f"{label}: binary_data_size is {size!r}; it must be a byte count", details={"field": f"{where}.parameters"}
        )
    if offset + size > len(rest):
        raise BadRequest(
            f"{label}: binary_data_size {size} runs past the end of the body ({len(rest) - offset} bytes left)",
            details={"field": f"{where}.parameters"},
        )
    buf = rest[offset : offset + size]
    return Tensor(name, datatype, shape, _from_binary(buf, datatype, shape, count, label, where)), size


def _flatten(data: Any, out: list) -> None:
    for item in data:
        if isinstance(item, list):
            _flatten(item, out)
        else:
            out.append(item)


def _from_json(data: Any, datatype: str, shape: list[int], count: int, label: str, where: str) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    flat: list[Any] = []
    try:
        _flatten(data, flat)
    except RecursionError:
        raise BadRequest(f"{label}: 'data' is nested too deeply", details={"field": f"{where}.data"}) from None
    if len(flat) != count:
        raise BadRequest(
            f"{label} has {len(flat)} values but shape {shape} needs {count}", details={"field": f"{where}.data"}
        )
    dtype = _dtype(datatype)
    if datatype == "BYTES":
        bad = next((v for v in flat if not isinstance(v, str)), None)
        if bad is not None:
            raise BadRequest(f"{label} is BYTES; every value must be a string, not {bad!r}", details={"field": f"{where}.data"})
        arr = np.empty(count, dtype=object)
        arr[:] = [v.encode("utf-8") for v in flat]
        return arr.reshape(shape)
    if datatype == "BOOL":
        ok = all(isinstance(v, bool) for v in flat)
    elif dtype.kind in "iu":
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)
    if not ok:
        bad = next(v for v in flat if not _fits_kind(v, datatype, dtype))
        raise BadRequest(
            f"{label} is {datatype} but holds {bad!r} ({type(bad).__name__})", details={"field": f"{where}.data"}
        )
    if dtype.kind in "iu" and flat:
        info = np.iinfo(dtype)
        lo, hi = min(flat), max(flat)
        if lo < info.min or hi > info.max:
            raise BadRequest(
                f"{label} is {datatype} but holds {lo if lo < info.min else hi}, outside [{info.min}, {info.max}]",
                details={"field": f"{where}.data"},
            )
    try:
        return np.asarray(flat, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise BadRequest(f"{label}: values do not fit {datatype}: {exc}", details={"field": f"{where}.data"}) from None


def _fits_kind(v: Any, datatype: str, dtype: np.dtype) -> bool:
    if datatype == "BOOL":
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    return isinstance(v, int) if dtype.kind in "iu" else isinstance(v, (int, float))


def _from_binary(buf: memoryview, datatype: str, shape: list[int], count: int, label: str, where: str) -> np.ndarray:
    if datatype == "BYTES":
        try:
            items = deserialize_bytes_tensor(buf)
        except struct.error:  # tritonclient's decoder does not say where the data ran short
            raise BadRequest(
                f"{label}: the BYTES data runs past binary_data_size (an element or its 4-byte length is cut short)",
                details={"field": f"{where}.parameters"},
            ) from None
        if len(items) != count:
            raise BadRequest(
                f"{label} has {len(items)} BYTES elements but shape {shape} needs {count}",
                details={"field": f"{where}.parameters"},
            )
        return items.reshape(shape)
    dtype = _dtype(datatype)
    need = count * dtype.itemsize
    if len(buf) != need:
        raise BadRequest(
            f"{label}: binary_data_size is {len(buf)} bytes but shape {shape} of {datatype} needs {need}",
            details={"field": f"{where}.parameters"},
        )
    if datatype == "BOOL":  # any non-zero byte is True (a plain bool view, as tritonclient reads it, keeps 2 as a bad bool)
        return np.frombuffer(buf, dtype=np.uint8).astype(bool).reshape(shape)
    return np.frombuffer(buf, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _decode_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list of {\"name\": ...} objects", details={"field": "outputs"})
    out: list[RequestedOutput] = []
    for i, item in enumerate(raw):
        where = f"outputs[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise BadRequest(f"{where} must be an object with a 'name'", details={"field": where})
        params = _parameters(item.get("parameters"), f"{where}.parameters")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"{where}.parameters.binary_data must be true or false", details={"field": where})
        if any(o.name == item["name"] for o in out):
            raise BadRequest(f"output {item['name']!r} is requested twice", details={"field": where})
        out.append(RequestedOutput(item["name"], binary))
    return out


# -- the model's side ---------------------------------------------------------------------------
def model_payload(request: InferRequest) -> dict[str, Any]:
    """The prediction payload for the serving pipeline (``app/serving/payload.py``).

    One input of shape ``[rows, n_features]`` becomes ``{"tensor": float32 matrix}``; several
    inputs, each ``[rows]`` or ``[rows, 1]`` and named after the model's features, become
    columns ``{"inputs": {name: values}}``. The pipeline checks widths and names.
    """
    for t in request.inputs:
        if t.datatype not in NUMERIC:
            raise BadRequest(
                f"input {t.name!r} is {t.datatype}; the model takes numbers (FP32, or any INT/UINT/FP type)",
                details={"field": "datatype", "input": t.name},
            )
    if len(request.inputs) == 1:
        t = request.inputs[0]
        if len(t.shape) != 2:
            raise BadRequest(
                f"input {t.name!r} has shape {t.shape}; the model takes [rows, n_features], e.g. [1, 4]",
                details={"field": "shape", "input": t.name},
            )
        return {"tensor": np.ascontiguousarray(t.data, dtype=np.float32)}
    rows = {t.shape[0] if t.shape else -1 for t in request.inputs}
    for t in request.inputs:
        if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
            raise BadRequest(
                f"input {t.name!r} has shape {t.shape}; with one input per feature each must be [rows] or [rows, 1]",
                details={"field": "shape", "input": t.name},
            )
    if len(rows) != 1:
        raise BadRequest("every input must have the same number of rows", details={"field": "shape"})
    return {"inputs": {t.name: t.data.astype(np.float32).ravel().tolist() for t in request.inputs}}


def prediction_tensors(result: dict[str, Any], label_output: str = "label") -> dict[str, np.ndarray]:
    """A runtime's ``{"predictions", "probabilities"?}`` -> output tensors named as the ONNX
    model names them (``label`` or ``variable``, and ``probabilities``)."""
    out = {label_output: _to_array(result["predictions"])}
    if result.get("probabilities") is not None:
        out["probabilities"] = np.asarray(result["probabilities"], dtype=np.float32)
    return out


def _to_array(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind in "US" or arr.dtype == object:
        flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in arr.ravel().tolist()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(arr.shape)
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    return arr.astype(np.float32)


def datatype_of(arr: np.ndarray) -> str:
    # np_to_triton_dtype knows object and bytes arrays but not numpy's unicode strings (labels).
    if arr.dtype.kind == "U":
        return "BYTES"
    datatype = np_to_triton_dtype(arr.dtype.newbyteorder("="))
    if datatype not in DATATYPES:
        raise BadRequest(f"no V2 datatype for numpy dtype {arr.dtype}")
    return datatype


def select_outputs(available: dict[str, np.ndarray], request: InferRequest) -> list[tuple[str, np.ndarray, bool]]:
    """``(name, array, binary)`` for each output the client asked for (all when none)."""
    if request.outputs is None:
        return [(n, a, request.binary_data_output) for n, a in available.items()]
    chosen = []
    for o in request.outputs:
        if o.name not in available:
            raise BadRequest(
                f"output {o.name!r} is not an output of this model; it has {', '.join(available)}",
                details={"field": "outputs", "output": o.name},
            )
        chosen.append((o.name, available[o.name], request.binary_data_output if o.binary is None else o.binary))
    return chosen


# -- encoding -----------------------------------------------------------------------------------
def encode_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: list[tuple[str, np.ndarray, bool]],
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when some outputs are binary, the JSON header's length (send it
    as ``Inference-Header-Content-Length`` with content type application/octet-stream)."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = str(model_version)
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    entries, blobs = [], []
    for name, arr, binary in outputs:
        datatype = datatype_of(arr)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = to_binary(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(arr, datatype)
        entries.append(entry)
    doc["outputs"] = entries
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def to_binary(arr: np.ndarray, datatype: str) -> bytes:
    """The raw little-endian bytes of a tensor as the binary extension (and gRPC's raw contents)
    carry it; BYTES as a 4-byte length then the bytes, per element."""
    if datatype == "BYTES":
        return serialize_byte_tensor(np.asarray(arr, dtype=object)).item() if arr.size else b""
    return np.ascontiguousarray(arr, dtype=_dtype(datatype)).tobytes()


def _to_json(arr: np.ndarray, datatype: str) -> list:
    flat = arr.ravel().tolist()
    if datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat


def decode_response(body: bytes, header_length: int | None = None) -> dict[str, np.ndarray]:
    """Output name -> array from a response body: the inverse of :func:`encode_response`, for
    clients and tests that do not use tritonclient."""
    head, rest = (body[:header_length], body[header_length:]) if header_length is not None else (body, b"")
    doc = json.loads(head)
    out, offset = {}, 0
    for o in doc["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        count = math.prod(o["shape"])
        if size is None:
            out[o["name"]] = _from_json(o["data"], o["datatype"], o["shape"], count, o["name"], o["name"])
        else:
            out[o["name"]] = _from_binary(
                memoryview(rest)[offset : offset + size], o["datatype"], o["shape"], count, o["name"], o["name"]
            )
            offset += size
    return out
