"""The gRPC form of the Open Inference Protocol (app/serving/v2_proto.py): requests built by
tritonclient.grpc's own request builder, decoded by the same rules as REST; responses read back
by tritonclient.grpc's InferResult."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc._utils import _get_inference_request

from app.errors import BadRequest
from app.serving import v2_codec, v2_proto

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def _request(inputs, outputs=None, request_id="", model_version="", parameters=None) -> pb.ModelInferRequest:
    """The ModelInferRequest tritonclient.grpc's InferenceServerClient.infer sends."""
    return _get_inference_request(
        model_name="iris", inputs=inputs, model_version=model_version, request_id=request_id, outputs=outputs,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=parameters,
    )


def _input(name: str, arr: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    return inp


def test_a_tritonclient_request_decodes_like_its_rest_twin():
    outputs = [grpcclient.InferRequestedOutput("label")]
    req = v2_proto.decode_infer_request(_request([_input("X", ROWS, "FP32")], outputs, request_id="r-7"))
    assert req.id == "r-7" and [o.name for o in req.outputs] == ["label"]
    assert req.inputs[0].name == "X" and req.inputs[0].shape == [2, 4]
    assert np.array_equal(req.inputs[0].data, ROWS)
    assert np.array_equal(v2_codec.model_payload(req)["tensor"], ROWS)
    rest = v2_codec.decode_request(
        b'{"id": "r-7", "inputs": [{"name": "X", "datatype": "FP32", "shape": [2, 4], "data": %s}], '
        b'"outputs": [{"name": "label"}]}' % str(ROWS.tolist()).encode()
    )
    assert np.array_equal(rest.inputs[0].data, req.inputs[0].data) and rest.outputs == req.outputs


def test_typed_contents_and_every_datatype_tritonclient_sends_raw():
    request = pb.ModelInferRequest(model_name="iris")
    t = request.inputs.add(name="X", datatype="FP64", shape=[1, 2])
    t.contents.fp64_contents.extend([1.5, 2.5])
    b = request.inputs.add(name="s", datatype="BYTES", shape=[2])
    b.contents.bytes_contents.extend([b"a", b"bc"])
    req = v2_proto.decode_infer_request(request)
    assert req.inputs[0].data.tolist() == [[1.5, 2.5]] and req.inputs[1].data.tolist() == [b"a", b"bc"]
    for datatype, arr in [
        ("INT8", np.array([[-1, 2]], np.int8)), ("UINT16", np.array([[1, 2]], np.uint16)),
        ("INT64", np.array([[7, 8]], np.int64)), ("FP16", np.array([[0.5, 1]], np.float16)),
        ("BOOL", np.array([[True, False]])), ("BYTES", np.array([[b"x", b"yz"]], dtype=object)),
    ]:
        got = v2_proto.decode_infer_request(_request([_input("X", arr, datatype)])).inputs[0]
        assert got.datatype == datatype and got.data.tolist() == arr.tolist(), datatype


def test_request_parameters_and_ids_come_across():
    req = v2_proto.decode_infer_request(_request([_input("X", ROWS, "FP32")], parameters={"k": 3, "flag": True}))
    assert req.parameters == {"k": 3, "flag": True} and req.id is None and req.outputs is None


@pytest.mark.parametrize(
    "build,fragment",
    [
        (lambda r: r.raw_input_contents.append(b"\0" * 4), "2 raw_input_contents"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), "binary_data_size is 12 bytes but shape [2, 4]"),
        (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "both contents and raw_input_contents"),
        (lambda r: setattr(r.inputs[0], "datatype", "FLOAT"), "datatype 'FLOAT'"),
        (lambda r: (r.inputs.add().CopyFrom(r.inputs[0]), r.raw_input_contents.append(r.raw_input_contents[0])),
         "given twice"),
    ],
)
def test_malformed_requests_are_bad_requests_naming_the_problem(build, fragment):
    request = _request([_input("X", ROWS, "FP32")])
    build(request)
    with pytest.raises(BadRequest) as err:
        v2_proto.decode_infer_request(request)
    assert fragment in err.value.message


def test_typed_contents_are_checked_too():
    request = pb.ModelInferRequest(model_name="iris")
    t = request.inputs.add(name="X", datatype="FP32", shape=[1, 4])
    t.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(BadRequest, match="has 3 values but shape"):
        v2_proto.decode_infer_request(request)
    t.datatype = "FP16"
    with pytest.raises(BadRequest, match="send it as raw_input_contents"):
        v2_proto.decode_infer_request(request)
    request = pb.ModelInferRequest(model_name="iris")
    i = request.inputs.add(name="X", datatype="INT8", shape=[1])
    i.contents.int_contents.append(300)
    with pytest.raises(BadRequest, match="outside"):
        v2_proto.decode_infer_request(request)


def test_a_response_reads_back_with_tritonclient():
    labels = np.array(["setosa", "virginica"])
    outputs = [("label", v2_codec.prediction_tensors({"predictions": labels})["label"], False),
               ("probabilities", np.array([[0.9, 0.1], [0.2, 0.8]], np.float32), True)]
    response = v2_proto.encode_infer_response("iris", "3", "r-1", outputs)
    result = grpcclient.InferResult(response)
    assert response.model_version == "3" and response.id == "r-1"
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "BYTES", [2]), ("probabilities", "FP32", [2, 2])
    ]
    assert result.as_numpy("label").tolist() == [b"setosa", b"virginica"]
    assert np.array_equal(result.as_numpy("probabilities"), outputs[1][1])


def test_metadata_messages():
    server = v2_proto.server_metadata_response({"name": "matih-ml", "version": "1.0", "extensions": ["x"]})
    assert (server.name, server.version, list(server.extensions)) == ("matih-ml", "1.0", ["x"])
    meta = v2_proto.model_metadata_response({
        "name": "iris", "versions": ["3"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
        "parameters": {"model": "iris"},
    })
    assert list(meta.versions) == ["3"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("X", "FP32", [-1, 4])]
    assert [t.name for t in meta.outputs] == ["label"]
