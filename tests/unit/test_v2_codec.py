"""The Open Inference Protocol codec, checked against tritonclient's own encoder and decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.http import InferResult
from tritonclient.http._utils import _get_inference_request

from app.errors import BadRequest, InvalidInput
from app.serving.signature import ModelSignature
from app.serving import v2_codec as codec
from app.serving.payload import payload_to_matrix


def _triton_body(inputs, outputs=None, request_id=""):
    """What tritonclient puts on the wire: (body, Inference-Header-Content-Length or None)."""
    return _get_inference_request(
        inputs=inputs, request_id=request_id, outputs=outputs, sequence_id=0, sequence_start=False,
        sequence_end=False, priority=0, timeout=None, custom_parameters=None,
    )


def _input(name, arr, datatype, binary):
    inp = httpclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


TENSORS = [
    ("fp32", np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32), "FP32"),
    ("fp64", np.array([1.5, -2.25], dtype=np.float64), "FP64"),
    ("fp16", np.array([[0.5, 1.0]], dtype=np.float16), "FP16"),
    ("int64", np.array([[1, -2, 3]], dtype=np.int64), "INT64"),
    ("int32", np.array([7, 8], dtype=np.int32), "INT32"),
    ("uint8", np.array([0, 255], dtype=np.uint8), "UINT8"),
    ("bool", np.array([True, False, True]), "BOOL"),
    ("bytes", np.array([b"setosa", b"virginica", b""], dtype=object), "BYTES"),
]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_requests_from_tritonclient_decode_to_the_same_tensors(binary):
    inputs = [_input(n, a, d, binary) for n, a, d in TENSORS]
    body, header_length = _triton_body(inputs, request_id="req-1")
    assert (header_length is not None) == binary
    req = codec.decode_request(body, header_length)
    assert req.id == "req-1" and req.outputs is None
    assert req.binary_data_output is True  # tritonclient asks for binary outputs when none are named
    for (name, arr, datatype), got in zip(TENSORS, req.inputs):
        assert (got.name, got.datatype, got.shape) == (name, datatype, list(arr.shape))
        if datatype == "BYTES":
            assert got.data.tolist() == arr.tolist()
        else:
            assert got.data.dtype == arr.dtype and np.array_equal(got.data, arr)


def test_nested_json_data_and_requested_outputs():
    body = json.dumps(
        {
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3.5, 4]]}],
            "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    req = codec.decode_request(body)
    assert req.inputs[0].data.tolist() == [[1, 2], [3.5, 4]]
    assert [(o.name, o.binary) for o in req.outputs] == [("label", None), ("probabilities", True)]
    outputs = codec.select_outputs({"label": np.array([0, 2]), "probabilities": np.zeros((2, 3), np.float32)}, req)
    assert [(n, b) for n, _, b in outputs] == [("label", False), ("probabilities", True)]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_responses_decode_with_tritonclient(binary):
    result = {"predictions": [0, 2], "probabilities": [[0.9, 0.05, 0.05], [0.0, 0.1, 0.9]]}
    tensors = codec.prediction_tensors(result)
    req = codec.InferRequest(inputs=[], binary_data_output=binary)
    body, header_length = codec.encode_response("iris", "1", "req-1", codec.select_outputs(tensors, req))
    assert (header_length is not None) == binary
    parsed = InferResult.from_response_body(body, header_length=header_length)
    assert parsed.get_response()["model_name"] == "iris" and parsed.get_response()["model_version"] == "1"
    assert parsed.get_response()["id"] == "req-1"
    assert parsed.as_numpy("label").dtype == np.int64 and parsed.as_numpy("label").tolist() == [0, 2]
    assert np.allclose(parsed.as_numpy("probabilities"), result["probabilities"])
    ours = codec.decode_response(body, header_length)
    assert ours["label"].tolist() == [0, 2] and ours["probabilities"].shape == (2, 3)


def test_string_labels_and_regression_values():
    tensors = codec.prediction_tensors({"predictions": ["setosa", "virginica"]})
    assert codec.datatype_of(tensors["label"]) == "BYTES"
    for binary in (False, True):
        body, n = codec.encode_response("m", "1", None, [("label", tensors["label"], binary)])
        got = InferResult.from_response_body(body, header_length=n).as_numpy("label").tolist()
        assert [v.decode() if isinstance(v, bytes) else v for v in got] == ["setosa", "virginica"]
    reg = codec.prediction_tensors({"predictions": [1.5, 2.25]}, label_output="variable")
    assert codec.datatype_of(reg["variable"]) == "FP32" and reg["variable"].tolist() == [1.5, 2.25]


def test_model_payload_single_matrix_and_feature_columns():
    req = codec.decode_request(
        json.dumps({"inputs": [{"name": "X", "datatype": "FP64", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
    )
    payload = codec.model_payload(req)
    assert payload["tensor"].dtype == np.float32 and payload["tensor"].shape == (1, 4)
    sig = ModelSignature(n_features=2, feature_names=["a", "b"])
    assert payload_to_matrix({"tensor": np.ones((3, 2))}, sig).shape == (3, 2)
    cols = codec.decode_request(
        json.dumps(
            {
                "inputs": [
                    {"name": "b", "datatype": "FP32", "shape": [2, 1], "data": [2, 4]},
                    {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 3]},
                ]
            }
        ).encode()
    )
    assert payload_to_matrix(codec.model_payload(cols), sig).tolist() == [[1, 2], [3, 4]]


def _one(inp, **extra):
    return json.dumps({"inputs": [inp], **extra}).encode()


FP32 = {"name": "X", "datatype": "FP32", "shape": [1, 2]}
BIN = {**FP32, "parameters": {"binary_data_size": 8}}
TWO_FLOATS = np.array([1, 2], dtype=np.float32).tobytes()


def _binary(head: dict, tail: bytes, declared: str | None = None):
    h = json.dumps(head).encode()
    return h + tail, declared if declared is not None else str(len(h))


@pytest.mark.parametrize(
    "body,header,fragment",
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"{}", None, "needs 'inputs'"),
        (json.dumps({"inputs": []}).encode(), None, "needs 'inputs'"),
        (_one({"datatype": "FP32", "shape": [1], "data": [1]}), None, "needs a 'name'"),
        (_one({**FP32, "datatype": "FLOAT", "data": [1, 2]}), None, "datatype 'FLOAT'"),
        (_one({**FP32, "datatype": "BF16", "data": [1, 2]}), None, "BF16 is not supported"),
        (_one({**FP32, "shape": [1, -2], "data": [1, 2]}), None, "non-negative integers"),
        (_one({**FP32, "shape": "1x2", "data": [1, 2]}), None, "shape '1x2'"),
        (_one({**FP32, "data": [1, 2, 3]}), None, "has 3 values but shape [1, 2] needs 2"),
        (_one({**FP32, "data": [1, "a"]}), None, "is FP32 but holds 'a'"),
        (_one({**FP32, "data": [1, True]}), None, "is FP32 but holds True"),
        (_one({**FP32, "datatype": "INT32", "data": [1, 1.5]}), None, "is INT32 but holds 1.5"),
        (_one({**FP32, "datatype": "INT8", "data": [1, 300]}), None, "outside [-128, 127]"),
        (_one({**FP32, "data": [1, 10**400]}), None, "do not fit FP32"),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "not valid JSON"),
        (_one({**FP32, "datatype": "BOOL", "data": [1, 0]}), None, "is BOOL but holds 1"),
        (_one({**FP32, "datatype": "BYTES", "data": ["a", 1]}), None, "every value must be a string"),
        (_one(FP32), None, "has no 'data'"),
        (_one({**BIN, "data": [1, 2]}), None, "both 'data' and binary_data_size"),
        (_one(BIN), None, "no Inference-Header-Content-Length header"),
        (*_binary({"inputs": [BIN]}, TWO_FLOATS, "abc"), "it must be the byte length"),
        (*_binary({"inputs": [BIN]}, TWO_FLOATS, "100000"), "but the body has"),
        (*_binary({"inputs": [BIN]}, TWO_FLOATS, "0"), "is 0 but the body"),
        (*_binary({"inputs": [BIN]}, TWO_FLOATS[:4]), "runs past the end of the body"),
        (*_binary({"inputs": [BIN]}, TWO_FLOATS + b"\0"), "add up to 8"),
        (*_binary({"inputs": [{**BIN, "parameters": {"binary_data_size": 4}}]}, TWO_FLOATS[:4]), "needs 8"),
        (*_binary({"inputs": [{**BIN, "parameters": {"binary_data_size": -1}}]}, b""), "must be a byte count"),
        (
            *_binary({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]},
                     b"\x05\0\0\0ab"),
            "runs past binary_data_size",
        ),
        (
            *_binary({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 6}}]},
                     b"\x02\0\0\0ab"),
            "has 1 BYTES elements but shape [2] needs 2",
        ),
        (json.dumps({"inputs": [{**FP32, "data": [1, 2]}] * 2}).encode(), None, "given twice"),
        (_one({**FP32, "data": [1, 2]}, id=5), None, "'id' must be a string"),
        (_one({**FP32, "data": [1, 2]}, outputs={"name": "label"}), None, "'outputs' must be a list"),
        (_one({**FP32, "data": [1, 2]}, outputs=[{"nom": "label"}]), None, "outputs[0] must be an object with a 'name'"),
        (_one({**FP32, "data": [1, 2]}, outputs=[{"name": "l", "parameters": {"binary_data": "yes"}}]), None,
         "binary_data must be true or false"),
        (_one({**FP32, "data": [1, 2]}, outputs=[{"name": "l"}, {"name": "l"}]), None, "requested twice"),
        (_one({**FP32, "data": [1, 2]}, parameters={"binary_data_output": 1}), None, "binary_data_output"),
    ],
)
def test_malformed_requests_are_bad_requests_naming_the_problem(body, header, fragment):
    with pytest.raises(BadRequest) as err:
        codec.decode_request(body, header)
    assert fragment in err.value.message


@pytest.mark.parametrize(
    "inputs,fragment",
    [
        ([{"name": "X", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "is BYTES; the model takes numbers"),
        ([{"name": "X", "datatype": "BOOL", "shape": [1, 1], "data": [True]}], "is BOOL"),
        ([{"name": "X", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}], "takes [rows, n_features]"),
        (
            [{"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]},
             {"name": "b", "datatype": "FP32", "shape": [1], "data": [1]}],
            "each must be [rows] or [rows, 1]",
        ),
        (
            [{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]},
             {"name": "b", "datatype": "FP32", "shape": [1], "data": [1]}],
            "same number of rows",
        ),
    ],
)
def test_inputs_the_model_cannot_take_are_bad_requests(inputs, fragment):
    req = codec.decode_request(json.dumps({"inputs": inputs}).encode())
    with pytest.raises(BadRequest, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        codec.model_payload(req)


def test_unknown_requested_output_is_a_bad_request():
    req = codec.decode_request(_one({**FP32, "data": [1, 2]}, outputs=[{"name": "scores"}]))
    with pytest.raises(BadRequest, match="'scores' is not an output of this model; it has label"):
        codec.select_outputs({"label": np.array([1])}, req)


@pytest.mark.parametrize(
    "tensor,fragment",
    [
        (np.ones((2, 3), dtype=np.float32), "has 3 features; the model takes 2"),
        (np.ones(2), "must be [rows, n_features]"),
        (np.zeros((0, 2)), "at least one row"),
        (np.array([[1.0, np.nan]]), "NaN or infinite"),
        ([["a", "b"]], "holds <U1 values"),
        ([[1, 2], [3]], "2-D matrix of numbers"),
    ],
)
def test_tensor_payload_is_checked_against_the_signature(tensor, fragment):
    with pytest.raises(InvalidInput) as err:
        payload_to_matrix({"tensor": tensor}, ModelSignature(n_features=2))
    assert fragment in err.value.message and err.value.details.get("field", "tensor") == "tensor"
    with pytest.raises(InvalidInput, match="exactly one of"):
        payload_to_matrix({"tensor": [[1, 2]], "instances": [[1, 2]]}, ModelSignature(n_features=2))
