"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService) through Serve's gRPC
ingress, spoken by tritonclient.grpc; and the ``triton`` runtime speaking gRPC to it."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
ROWS = np.array([SETOSA, VIRGINICA], dtype=np.float32)


@pytest.fixture(scope="module")
def triton(platform):
    client = grpcclient.InferenceServerClient(url=platform.grpc)
    yield client
    client.close()


@pytest.fixture
def auth(platform) -> dict[str, str]:
    return {"authorization": f"Bearer {platform.admin_token}"}


def _input(rows: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("X", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows)
    return inp


def _status(err: pytest.ExceptionInfo) -> str:
    return err.value.status()  # tritonclient.grpc: "StatusCode.NOT_FOUND"


def test_health_and_metadata(platform, iris, triton, auth):
    assert triton.is_server_live() and triton.is_server_ready()  # no token needed, as over REST
    meta = triton.get_server_metadata(headers=auth, as_json=True)
    assert meta["name"] == "matih-ml" and "binary_tensor_data" in meta["extensions"]
    with pytest.raises(InferenceServerException) as err:
        triton.get_server_metadata()
    assert _status(err) == "StatusCode.UNAUTHENTICATED" and "missing bearer token" in err.value.message()

    assert triton.is_model_ready("iris", headers=auth)
    assert triton.is_model_ready("iris", model_version="1", headers=auth)
    assert not triton.is_model_ready("no-such-model", headers=auth)
    meta = triton.get_model_metadata("iris", headers=auth)
    assert meta.name == "iris" and meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("X", "FP32", [-1, 4])]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("label", "INT64"), ("probabilities", "FP32")]
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no-such-model", headers=auth)
    assert _status(err) == "StatusCode.NOT_FOUND" and "neither an endpoint nor a registered model" in err.value.message()


def test_infer_same_answers_as_rest(platform, iris, triton, auth):
    with platform.client() as c:
        want = c.post("/v1/endpoints/iris/predict", json={"instances": ROWS.tolist(), "return_probabilities": True}).json()
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("label", "probabilities")]
    for version in ("", "1"):
        res = triton.infer("iris", [_input(ROWS)], model_version=version, outputs=outputs, request_id="g-1",
                           headers=auth)
        body = res.get_response()
        assert body.model_name == "iris" and body.id == "g-1" and body.model_version == "1"
        assert res.as_numpy("label").tolist() == [0, 2]
        assert np.allclose(res.as_numpy("probabilities"), want["probabilities"], atol=1e-6)
    res = triton.infer("iris", [_input(ROWS)], outputs=outputs[:1], headers=auth)  # only what was asked
    assert [o.name for o in res.get_response().outputs] == ["label"] and res.as_numpy("probabilities") is None


def test_errors_are_status_codes(platform, iris, triton, auth):
    with pytest.raises(InferenceServerException) as err:
        triton.infer("iris", [_input(ROWS)])
    assert _status(err) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as err:
        triton.infer("iris", [_input(ROWS)], headers={"authorization": "Bearer not-a-token"})
    assert _status(err) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as err:
        triton.infer("no-such-model", [_input(ROWS)], headers=auth)
    assert _status(err) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as err:
        triton.infer("iris", [_input(ROWS[:, :3].copy())], headers=auth)
    assert _status(err) == "StatusCode.INVALID_ARGUMENT" and "the model takes 4" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        triton.infer("iris", [_input(ROWS)], outputs=[grpcclient.InferRequestedOutput("scores")], headers=auth)
    assert _status(err) == "StatusCode.INVALID_ARGUMENT" and "'scores' is not an output" in err.value.message()
    with platform.client() as c:
        viewer = c.post("/v1/tokens", json={"name": "grpc-viewer", "role": "viewer"}).json()["token"]
    viewer_auth = {"authorization": f"Bearer {viewer}"}
    assert triton.is_model_ready("iris", headers=viewer_auth)
    with pytest.raises(InferenceServerException) as err:
        triton.infer("iris", [_input(ROWS)], headers=viewer_auth)
    assert _status(err) == "StatusCode.PERMISSION_DENIED" and "needs predictor" in err.value.message()


def test_triton_runtime_speaks_grpc_to_a_remote_v2_server(platform, iris, auth):
    """The platform's own gRPC service plays the remote Triton server."""
    config = {"url": platform.grpc, "protocol": "grpc", "model_name": "iris", "headers": auth, "timeout_s": 60}
    body = {"instances": [SETOSA, VIRGINICA], "return_probabilities": True}
    with platform.client() as c:
        r = c.post("/v1/endpoints", json={"name": "iris-triton-grpc", "target": "iris@champion", "runtime": "triton",
                                          "config": config})
        assert r.status_code == 201, r.text
        try:
            want = c.post("/v1/endpoints/iris/predict", json=body).json()
            got = c.post("/v1/endpoints/iris-triton-grpc/predict", json=body)
            assert got.status_code == 200, got.text
            assert got.json()["predictions"] == [0, 2]
            assert np.allclose(got.json()["probabilities"], want["probabilities"], atol=1e-6)
            bad = c.post("/v1/endpoints/iris-triton-grpc/predict", json={"instances": [[1.0, 2.0]]})
            assert bad.status_code == 422 and "the model takes 4" in bad.json()["error"]

            r = c.put("/v1/endpoints/iris-triton-grpc", json={"config": {**config, "model_name": "no-such-model"}})
            assert r.status_code == 200
            r = c.post("/v1/endpoints/iris-triton-grpc/predict", json=body)
            assert r.status_code == 404 and "config.model_name" in r.json()["error"]
            r = c.put("/v1/endpoints/iris-triton-grpc",
                      json={"config": {**config, "headers": {"authorization": "Bearer wrong"}}})
            r = c.post("/v1/endpoints/iris-triton-grpc/predict", json=body)
            assert r.status_code == 503 and "credentials" in r.json()["error"]
            r = c.put("/v1/endpoints/iris-triton-grpc", json={"config": {**config, "url": "127.0.0.1:9", "timeout_s": 2}})
            r = c.post("/v1/endpoints/iris-triton-grpc/predict", json=body)
            assert r.status_code == 503 and "127.0.0.1:9" in r.json()["error"]
            r = c.put("/v1/endpoints/iris-triton-grpc", json={"config": {**config, "url": "localhost:9000"}})
            assert r.status_code == 422 and r.json()["code"] == "host_not_allowed", r.text
        finally:
            c.delete("/v1/endpoints/iris-triton-grpc")
