"""The Open Inference Protocol (KServe V2) over real HTTP, spoken by tritonclient, and the
``triton`` runtime serving an endpoint from a real V2 server: the platform's own V2 routes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
ROWS = np.array([SETOSA, VIRGINICA], dtype=np.float32)


def _hostport(platform) -> str:
    return platform.url.split("://", 1)[1]


@pytest.fixture
def triton(platform):
    """A tritonclient client (one per test: its connections belong to one thread)."""
    client = httpclient.InferenceServerClient(url=_hostport(platform), network_timeout=120)
    yield client
    client.close()


@pytest.fixture
def auth(platform) -> dict[str, str]:
    return {"Authorization": f"Bearer {platform.admin_token}"}


@pytest.fixture(scope="module")
def champion(platform, iris) -> str:
    with platform.client() as c:
        return c.get("/v1/endpoints/iris").json()["model_version"]


def _input(rows: np.ndarray, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput("X", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows, binary_data=binary)
    return inp


def test_health_and_server_metadata(platform, triton, auth):
    assert triton.is_server_live() and triton.is_server_ready()  # no token needed
    meta = triton.get_server_metadata(headers=auth)
    assert meta["name"] == "matih-ml" and "binary_tensor_data" in meta["extensions"]
    with pytest.raises(InferenceServerException) as err:
        triton.get_server_metadata()
    assert err.value.status() == "401"


def test_model_readiness_and_metadata(platform, iris, champion, triton, auth):
    assert triton.is_model_ready("iris", headers=auth)
    assert triton.is_model_ready("iris", model_version=champion, headers=auth)
    assert not triton.is_model_ready("no-such-model", headers=auth)
    assert not triton.is_model_ready("iris", model_version="999", headers=auth)
    meta = triton.get_model_metadata("iris", headers=auth)
    assert meta["name"] == "iris" and meta["versions"] == [champion] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 3])
    ]
    assert triton.get_model_metadata("iris", model_version="1", headers=auth)["versions"] == ["1"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_with_tritonclient(platform, iris, champion, triton, auth, binary):
    with platform.client() as c:
        want = c.post("/v1/endpoints/iris/predict", json={"instances": ROWS.tolist(), "return_probabilities": True}).json()
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
    for version in ("", "1"):
        res = triton.infer("iris", [_input(ROWS, binary)], model_version=version, outputs=outputs,
                           request_id="r-1", headers=auth)
        body = res.get_response()
        assert body["model_name"] == "iris" and body["id"] == "r-1"
        assert body["model_version"] == (version or champion)
        assert res.as_numpy("label").tolist() == [0, 2]
        assert np.allclose(res.as_numpy("probabilities"), want["probabilities"], atol=1e-6)
        assert all(("parameters" in o) == binary for o in body["outputs"])
    # no outputs named: every output, in binary (tritonclient asks so); only label when asked
    res = triton.infer("iris", [_input(ROWS, binary)], headers=auth)
    assert {o["name"] for o in res.get_response()["outputs"]} == {"label", "probabilities"}
    res = triton.infer("iris", [_input(ROWS, binary)], outputs=outputs[:1], headers=auth)
    assert [o["name"] for o in res.get_response()["outputs"]] == ["label"]
    assert res.as_numpy("probabilities") is None


def test_binary_response_headers_and_json_body_over_raw_http(platform, iris):
    head = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4],
                                   "parameters": {"binary_data_size": 16}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
    with platform.client() as c:
        r = c.post("/v2/models/iris/infer", content=head + np.array(SETOSA, np.float32).tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        n = int(r.headers["inference-header-content-length"])
        doc = json.loads(r.content[:n])
        assert doc["outputs"][0]["parameters"]["binary_data_size"] == 8
        assert np.frombuffer(r.content[n:], dtype="<i8").tolist() == [0]
        r = c.post("/v2/models/iris/infer",
                   json={"inputs": [{"name": "X", "datatype": "FP64", "shape": [1, 4], "data": [VIRGINICA]}]})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["label"]["data"] == [2] and len(outs["probabilities"]["data"]) == 3


GOOD_INPUT = {"name": "X", "datatype": "FP32", "shape": [1, 4], "data": SETOSA}


@pytest.mark.parametrize(
    "body,headers,fragment",
    [
        (b"{not json", {}, "not valid JSON"),
        (json.dumps({"outputs": []}).encode(), {}, "needs 'inputs'"),
        (json.dumps({"inputs": [{**GOOD_INPUT, "datatype": "FLOAT"}]}).encode(), {}, "datatype 'FLOAT'"),
        (json.dumps({"inputs": [{**GOOD_INPUT, "datatype": "BYTES", "data": ["a"] * 4}]}).encode(), {}, "is BYTES"),
        (json.dumps({"inputs": [{**GOOD_INPUT, "shape": [2, 4]}]}).encode(), {}, "has 4 values but shape [2, 4]"),
        (json.dumps({"inputs": [{**GOOD_INPUT, "shape": [1, 3], "data": SETOSA[:3]}]}).encode(), {},
         "has 3 features; the model takes 4"),
        (json.dumps({"inputs": [GOOD_INPUT]}).encode(), {"Inference-Header-Content-Length": "x1"},
         "Inference-Header-Content-Length"),
        (json.dumps({"inputs": [GOOD_INPUT], "outputs": [{"name": "scores"}]}).encode(), {}, "'scores' is not an output"),
    ],
)
def test_malformed_v2_requests_get_400_with_an_error(platform, iris, body, headers, fragment):
    with platform.client() as c:
        r = c.post("/v2/models/iris/infer", content=body, headers=headers)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"] and r.json()["code"] == "bad_request"


def test_v2_errors_and_roles(platform, iris, triton):
    with platform.client() as c:
        r = c.post("/v2/models/no-such-model/infer", json={"inputs": [GOOD_INPUT]})
        assert r.status_code == 404 and "neither an endpoint nor a registered model" in r.json()["error"]
        viewer = c.post("/v1/tokens", json={"name": "v2-viewer", "role": "viewer"}).json()["token"]
    with platform.client(token=None) as anon:
        assert anon.post("/v2/models/iris/infer", json={"inputs": [GOOD_INPUT]}).status_code == 401
    with platform.client(viewer) as c:
        assert c.get("/v2/models/iris").status_code == 200
        assert c.post("/v2/models/iris/infer", json={"inputs": [GOOD_INPUT]}).status_code == 403
    with pytest.raises(InferenceServerException) as err:  # tritonclient sees the 400 and its message
        bad = httpclient.InferInput("X", [1, 3], "FP32")
        bad.set_data_from_numpy(np.ones((1, 3), np.float32))
        triton.infer("iris", [bad], headers={"Authorization": f"Bearer {platform.admin_token}"})
    assert err.value.status() == "400" and "the model takes 4" in err.value.message()


def test_triton_runtime_serves_an_endpoint_from_a_remote_v2_server(platform, iris, auth):
    """The platform's own V2 routes play the remote Triton server, a real server over HTTP."""
    config = {"url": _hostport(platform), "model_name": "iris", "headers": auth, "timeout_s": 60}
    body = {"instances": [SETOSA, VIRGINICA], "return_probabilities": True}
    with platform.client() as c:
        r = c.post("/v1/endpoints", json={"name": "iris-triton", "target": "iris@champion", "runtime": "triton",
                                          "config": config})
        assert r.status_code == 201, r.text
        # the credentials stay in the store; the API never shows them back
        assert r.json()["config"]["headers"] == {"Authorization": "***"}
        assert c.get("/v1/endpoints/iris-triton").json()["config"]["headers"] == {"Authorization": "***"}
        audit = c.get("/v1/audit", params={"resource_type": "endpoint", "limit": 500}).json()["items"]
        created = [a for a in audit if a["resource_id"] == "iris-triton" and a["action"] == "endpoint.create"]
        assert created and created[0]["after"]["config"]["headers"] == {"Authorization": "***"}
        assert auth["Authorization"] not in repr(audit)  # nor does the audit log keep them
        try:
            want = c.post("/v1/endpoints/iris/predict", json=body).json()
            got = c.post("/v1/endpoints/iris-triton/predict", json=body)
            assert got.status_code == 200, got.text
            assert got.json()["predictions"] == [0, 2]
            assert np.allclose(got.json()["probabilities"], want["probabilities"], atol=1e-6)
            # the local check uses the width the remote model declared
            bad = c.post("/v1/endpoints/iris-triton/predict", json={"instances": [[1.0, 2.0]]})
            assert bad.status_code == 422 and "the model takes 4" in bad.json()["error"]
            # and the endpoint speaks V2 itself: V2 -> triton runtime -> remote V2 -> ONNX Runtime
            v2 = c.post("/v2/models/iris-triton/infer",
                        json={"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": VIRGINICA}]})
            assert v2.status_code == 200, v2.text
            assert {o["name"]: o["data"] for o in v2.json()["outputs"]}["label"] == [2]
            assert c.get("/v2/models/iris-triton").json()["platform"] == "triton"

            # a model the remote server does not have, and a server that is not there
            r = c.put("/v1/endpoints/iris-triton", json={"config": {**config, "model_name": "no-such-model"}})
            assert r.status_code == 200
            r = c.post("/v1/endpoints/iris-triton/predict", json=body)
            assert r.status_code == 404 and "config.model_name" in r.json()["error"]
            r = c.put("/v1/endpoints/iris-triton", json={"config": {**config, "url": "127.0.0.1:9", "timeout_s": 2}})
            r = c.post("/v1/endpoints/iris-triton/predict", json=body)
            assert r.status_code == 503 and "127.0.0.1:9" in r.json()["error"]
            # a server not on runtimes.triton.allowed_hosts is refused at once, naming the setting
            r = c.put("/v1/endpoints/iris-triton", json={"config": {**config, "url": "localhost:8000"}})
            assert r.status_code == 422 and r.json()["code"] == "host_not_allowed", r.text
            assert "config.url" in r.json()["error"] and "runtimes.triton.allowed_hosts" in r.json()["error"]
            r = c.put("/v1/endpoints/iris-triton", json={"config": {**config, "timeout_s": 3600}})
            assert r.status_code == 422 and r.json()["details"]["field"] == "config.timeout_s"
            # a config the runtime cannot take is refused when it is set, not at the next prediction
            r = c.put("/v1/endpoints/iris-triton", json={"config": {"model_name": "iris"}})
            assert r.status_code == 422 and r.json()["details"]["field"] == "config.url"
        finally:
            c.delete("/v1/endpoints/iris-triton")
