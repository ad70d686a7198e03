"""Bad input gets a clear 4xx with the error body, and the next valid request still succeeds."""

import pytest

from tests.integration.conftest import IRIS_JOB

GOOD = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def _assert_error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "code"} and body["code"] == code and body["error"]


def _still_serves(c):
    r = c.post("/v1/endpoints/iris/predict", json=GOOD)
    assert r.status_code == 200 and r.json()["predictions"] == [0]


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"content": b'{"instances": [[5.1, 3.5,', "headers": {"content-type": "application/json"}}, 400, "bad_request"),
        ({"content": b"instances=1", "headers": {"content-type": "text/plain"}}, 400, "bad_request"),
        ({"json": [1, 2, 3]}, 400, "bad_request"),
        ({"json": {"instances": [[5.1, 3.5, 1.4]]}}, 422, "invalid_input"),
        ({"json": {"instances": [[5.1, 3.5, 1.4, 0.2, 9.9]]}}, 422, "invalid_input"),
        ({"json": {"instances": [["5.1", 3.5, 1.4, 0.2]]}}, 422, "invalid_input"),
        ({"json": {"instances": [[None, 3.5, 1.4, 0.2]]}}, 422, "invalid_input"),
        ({"json": {"instances": "5.1,3.5"}}, 422, "invalid_input"),
        ({"json": {"rows": [[5.1, 3.5, 1.4, 0.2]]}}, 422, "invalid_input"),
        ({"json": {"instances": [{"sepal_length": 1}]}}, 422, "invalid_input"),
    ],
)
def test_bad_predict_payloads(platform, iris, kwargs, status, code):
    with platform.client() as c:
        _assert_error(c.post("/v1/endpoints/iris/predict", **kwargs), status, code)
        _still_serves(c)


def test_unknown_endpoint_route_and_job(platform, iris):
    with platform.client() as c:
        _assert_error(c.post("/v1/endpoints/nope/predict", json=GOOD), 404, "not_found")
        _assert_error(c.get("/v1/jobs/no-such-job"), 404, "not_found")
        _assert_error(c.get("/v1/no-such-route"), 404, "not_found")
        _still_serves(c)


def test_missing_and_wrong_tokens(platform, iris):
    for token in (None, "wrong-token"):
        with platform.client(token=token) as c:
            r = c.post("/v1/endpoints/iris/predict", json=GOOD)
            _assert_error(r, 401, "unauthenticated")
            assert r.headers["www-authenticate"] == "Bearer"
    with platform.client() as c:
        _still_serves(c)


def test_body_over_the_limit_is_413(platform, iris):
    limit = platform.settings.http.max_body_bytes
    with platform.client() as c:
        big = b'{"instances": [[' + b"1.0," * (limit // 4) + b'1.0]]}'
        _assert_error(c.post("/v1/endpoints/iris/predict", content=big,
                             headers={"content-type": "application/json"}), 413, "payload_too_large")
        _still_serves(c)


def test_bad_training_specs_and_targets(platform, iris):
    with platform.client() as c:
        for body, field in [
            ({**IRIS_JOB, "estimator": "subprocess.Popen"}, "estimator"),
            ({**IRIS_JOB, "hyperparameters": "many"}, "hyperparameters"),
            ({**IRIS_JOB, "name": "../etc"}, "name"),
            ({k: v for k, v in IRIS_JOB.items() if k != "dataset"}, "dataset"),
        ]:
            r = c.post("/v1/training/jobs", json=body)
            _assert_error(r, 422, "invalid_input")
            assert r.json()["details"]["field"] == field
        _assert_error(c.post("/v1/endpoints", json={"name": "x", "target": "no target"}), 422, "invalid_input")
        _assert_error(c.post("/v1/endpoints", json={"name": "x", "target": "ghost@champion"}), 404, "not_found")
        _assert_error(c.post("/v1/endpoints", json={"name": "iris", "target": "iris@champion"}), 409, "conflict")
        # no GPUs on this cluster, so no GPU pool: asking for one is refused, not silently ignored
        r = c.post("/v1/endpoints", json={"name": "on-gpu", "target": "iris@champion", "config": {"device": "gpu"}})
        _assert_error(r, 422, "invalid_input")
        assert "no GPUs" in r.json()["error"]
        r = c.post("/v1/endpoints", json={"name": "on-tpu", "target": "iris@champion", "config": {"device": "tpu"}})
        _assert_error(r, 422, "invalid_input")
        assert c.get("/v1/endpoints/iris").json()["target"] == "iris@champion"  # nothing stored was lost
        _still_serves(c)


def test_a_bad_payload_is_not_logged_as_a_model_server_failure(platform, iris_ms):
    """The ModelServer hands a caller's error back as a value: the client gets its 422 and the
    replica's log has no failure (no traceback, no error message) for it."""
    import glob
    import os
    import uuid

    import ray

    marker = f"not_a_feature_{uuid.uuid4().hex[:8]}"
    row = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2, marker: 1.0}
    with platform.client() as c:
        r = c.post(f"/v1/endpoints/{iris_ms}/predict", json={"instances": [row]})
        _assert_error(r, 422, "invalid_input")
        assert marker in r.json()["error"]  # the message names the unknown field
        _still_serves(c)
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    replica_logs = glob.glob(os.path.join(logs, "replica_matih_ModelServer_*.log"))
    assert replica_logs
    for path in replica_logs:
        with open(path, errors="replace") as fh:
            assert marker not in fh.read(), path
