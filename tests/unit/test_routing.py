"""The one predict path (app.serving.routing) through the HTTP API without Ray: server-issued
request ids, the endpoint spec (versioned apart from the runtime config), what each
prediction hands the prediction log, for the REST and the V2 routes."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.support import in_process_context

from app.api.app import create_app
from app.bootstrap import prepare
from app.predlog.ids import is_request_id, new_request_id, request_id_time
from app.serving.request_ids import ServerRequestIds
from app.settings import load_settings


class Collect:
    """A prediction-log buffer that keeps what it is given (the interface: add(record) -> bool)."""

    def __init__(self):
        self.records = []

    def add(self, record) -> bool:
        self.records.append(record)
        return True


def _onnx_iris() -> bytes:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from app.onnx.sklearn_export import to_onnx

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    return to_onnx(LogisticRegression(max_iter=500).fit(X, y), X, True).SerializeToString()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, jobs=None)
    sink = Collect()
    ctx.router.buffer = sink
    client = TestClient(create_app(ctx))
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    r = client.post("/v1/models/flowers/versions", files={"file": ("model.onnx", _onnx_iris(), "application/octet-stream")},
                    data={"format": "onnx"})
    assert r.status_code == 201, r.text
    assert client.put("/v1/models/flowers/aliases/champion", json={"version": "1"}).status_code in (200, 201)
    assert client.post("/v1/endpoints", json={"name": "flowers", "target": "flowers@champion"}).status_code == 201
    return client, sink, ctx


ROW = [5.1, 3.5, 1.4, 0.2]


def test_request_ids_are_the_servers_and_the_clients_is_kept(api):
    client, sink, _ = api
    sink.records.clear()
    r = client.post("/v1/endpoints/flowers/predict", json={"instances": [ROW, ROW]}, headers={"X-Request-Id": "mine-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    rid = body["request_id"]
    assert is_request_id(rid) and rid != "mine-1" and r.headers["x-request-id"] == rid
    assert body["client_request_id"] == "mine-1" and body["variant"] is None and body["model_version"] == "1"
    (rec,) = sink.records
    assert rec.request_id == rid and rec.client_request_id == "mine-1" and rec.endpoint == "flowers"
    assert rec.model == "flowers" and rec.model_version == "1" and rec.protocol == "rest" and rec.variant == ""
    assert rec.inputs == {"instances": [ROW, ROW]} and rec.outputs["predictions"] == body["predictions"]
    assert rec.caller == "admin" and rec.latency_ms > 0
    assert abs(request_id_time(rid).timestamp() - rec.timestamp) < 5
    # ids without a client id: none kept, a fresh id each time
    a = client.post("/v1/endpoints/flowers/predict", json={"instances": [ROW]}).json()
    b = client.post("/v1/endpoints/flowers/predict", json={"instances": [ROW]}).json()
    assert a["request_id"] != b["request_id"] and "client_request_id" not in a


def test_refused_predictions_are_not_logged(api):
    client, sink, _ = api
    sink.records.clear()
    assert client.post("/v1/endpoints/flowers/predict", json={"instances": [[1.0, 2.0]]}).status_code == 422
    assert client.post("/v1/endpoints/nope/predict", json={"instances": [ROW]}).status_code == 404
    assert sink.records == []


def test_the_spec_is_typed_versioned_and_apart_from_the_config(api):
    client, sink, _ = api
    spec = {"logging": {"fields": ["outputs"], "retention_days": 7}}
    r = client.post("/v1/endpoints", json={"name": "quiet", "target": "flowers/1", "spec": spec})
    assert r.status_code == 201, r.text
    row = client.get("/v1/endpoints/quiet").json()
    assert row["spec_version"] == 1 and row["spec"]["logging"]["fields"] == ["outputs"]
    assert row["spec"]["logging"]["sample_rate"] == 1.0 and row["config"] == {}
    sink.records.clear()
    client.post("/v1/endpoints/quiet/predict", json={"instances": [ROW]}, headers={"X-Request-Id": "c"})
    (rec,) = sink.records
    assert rec.inputs is None and rec.caller is None and rec.client_request_id is None and rec.outputs is not None

    # a new spec counts the version up; the same spec again does not; the config is untouched
    r = client.put("/v1/endpoints/quiet", json={"spec": {"logging": {"sample_rate": 0.0}}})
    assert r.status_code == 200 and r.json()["spec_version"] == 2 and r.json()["config"] == {}
    r = client.put("/v1/endpoints/quiet", json={"spec": {"logging": {"sample_rate": 0.0}}})
    assert r.json()["spec_version"] == 2
    r = client.put("/v1/endpoints/quiet", json={"config": {"max_rows": 10}})
    assert r.json()["spec_version"] == 2 and r.json()["spec"]["logging"]["sample_rate"] == 0.0
    sink.records.clear()
    for _ in range(20):
        assert client.post("/v1/endpoints/quiet/predict", json={"instances": [ROW]}).status_code == 200
    assert sink.records == []
    client.put("/v1/endpoints/quiet", json={"spec": {"logging": {"enabled": False}}})
    client.post("/v1/endpoints/quiet/predict", json={"instances": [ROW]})
    assert sink.records == []

    for bad in ({"logging": {"sample_rate": 1.5}}, {"logging": {"fields": ["secrets"]}}, {"traffic": []},
                {"logging": {"retention_days": 0}}, {"logging": "all"}):
        r = client.put("/v1/endpoints/quiet", json={"spec": bad})
        assert r.status_code == 422, (bad, r.text)
    assert client.get("/v1/endpoints/quiet").json()["spec_version"] == 3  # nothing stored by the refusals


def test_sampling_keeps_about_the_rate(api):
    client, sink, _ = api
    client.post("/v1/endpoints", json={"name": "sampled", "target": "flowers/1", "spec": {"logging": {"sample_rate": 0.3}}})
    sink.records.clear()
    for _ in range(200):
        client.post("/v1/endpoints/sampled/predict", json={"instances": [ROW]})
    # binomial(200, 0.3): mean 60, sd 6.5; 30..90 is beyond 4.5 sd either side
    assert 30 <= len(sink.records) <= 90


def test_v2_infer_goes_through_the_router(api):
    client, sink, _ = api
    sink.records.clear()
    req = {"id": "v2-client", "inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": ROW}]}
    r = client.post("/v2/models/flowers/infer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    rid = r.headers["x-request-id"]
    assert body["id"] == "v2-client" and body["parameters"]["request_id"] == rid and is_request_id(rid)
    (rec,) = sink.records
    assert rec.protocol == "v2" and rec.client_request_id == "v2-client" and rec.request_id == rid
    assert rec.endpoint == "flowers" and isinstance(rec.inputs["tensor"], np.ndarray)
    # a registered model without an endpoint: logged under its name, without a client id the id is ours
    client.post("/v2/models/flowers/versions/1/infer", json={"inputs": req["inputs"]})
    assert sink.records[-1].endpoint == "flowers" and sink.records[-1].model_version == "1"


def test_the_request_id_middleware_replaces_the_clients_id():
    seen = {}

    async def app(scope, receive, send):
        seen.update({k.decode(): v.decode() for k, v in scope["headers"]})

    mw = ServerRequestIds(app)
    forged = new_request_id()
    scope = {"type": "http", "headers": [(b"x-request-id", b"client-7"), (b"x-matih-request-id", forged.encode()),
                                         (b"host", b"h")]}
    asyncio.run(mw(scope, None, None))
    assert seen["x-request-id"] == seen["x-matih-request-id"] != forged
    assert is_request_id(seen["x-request-id"]) and seen["x-matih-client-request-id"] == "client-7"
    assert seen["host"] == "h"
    seen.clear()
    asyncio.run(mw({"type": "http", "headers": []}, None, None))
    assert "x-matih-client-request-id" not in seen and is_request_id(seen["x-request-id"])
    assert json.dumps(seen)  # plain strings


def test_predictions_are_logged_read_back_and_joined_with_feedback(api):
    """The whole in-process chain: router -> replica buffer -> PredictionLogService -> parquet ->
    GET /predictions; feedback by the server's request id; the one join."""
    from app.predlog.feedback import FeedbackStore
    from app.predlog.join import labeled

    client, sink, ctx = api
    ctx.router.buffer = ctx.prediction_buffer
    try:
        client.post("/v1/endpoints", json={"name": "logged", "target": "flowers@champion"})
        ids = []
        for i in range(30):
            r = client.post("/v1/endpoints/logged/predict", json={"instances": [ROW, [6.7, 3.0, 5.2, 2.3]]},
                            headers={"X-Request-Id": f"c{i}"})
            ids.append(r.json()["request_id"])
        asyncio.run(ctx.prediction_buffer.flush())
        asyncio.run(ctx.predlog.flush())
        items, token = [], None
        while True:
            page = client.get("/v1/endpoints/logged/predictions", params={"limit": 25, **({"page_token": token} if token else {})})
            assert page.status_code == 200, page.text
            items += page.json()["items"]
            token = page.json()["next_page_token"]
            if not token:
                break
        assert len(items) == 60 and {i["request_id"] for i in items} == set(ids)
        first = next(i for i in items if i["request_id"] == ids[0] and i["instance"] == 1)
        assert first["inputs"] and first["client_request_id"] == "c0" and first["caller"] == "admin"
        assert first["model_version"] == "1" and first["protocol"] == "rest"
        stats = client.get("/v1/endpoints/logged/log/stats").json()
        assert stats["written"] >= 30 and stats["rows_written"] >= 60 and stats["dropped"] == 0

        fb = client.post("/v1/endpoints/logged/feedback",
                         json=[{"request_id": ids[0], "label": 0}, {"request_id": ids[1], "instance": 1, "label": 2},
                               {"request_id": new_request_id(0.0), "label": 1}])
        assert fb.status_code == 200, fb.text
        assert [r["status"] for r in fb.json()["results"]] == ["accepted", "accepted", "rejected"]
        from datetime import datetime, timedelta, timezone

        now = datetime.now(timezone.utc)
        joined = labeled(ctx.settings, FeedbackStore(ctx.store), "logged", now - timedelta(hours=1), now + timedelta(minutes=1))
        rows = {(r["request_id"], r["instance"]): r for r in joined.to_pylist()}
        assert len(rows) == 2 and json.loads(rows[(ids[1], 1)]["feedback_label"]) == 2

        erased = client.post("/v1/endpoints/logged/predictions/erase", json={"request_ids": [ids[0]]})
        assert erased.status_code == 200 and erased.json()["records_removed"] == 2
        assert erased.json()["feedback_removed"] == 1
        left = client.get("/v1/endpoints/logged/predictions", params={"limit": 1000}).json()["items"]
        assert len(left) == 58 and ids[0] not in {i["request_id"] for i in left}
    finally:
        ctx.router.buffer = sink


def test_logging_probabilities_keeps_them_in_the_log_not_in_the_answer(api):
    """spec.logging.probabilities: every logged prediction keeps the class probabilities (what
    CBPE reads), while the answer carries them only for a caller that asked."""
    client, sink, _ = api
    spec = {"logging": {"probabilities": True}}
    assert client.post("/v1/endpoints", json={"name": "probs", "target": "flowers/1", "spec": spec}).status_code == 201
    sink.records.clear()
    plain = client.post("/v1/endpoints/probs/predict", json={"instances": [ROW]}).json()
    asked = client.post("/v1/endpoints/probs/predict", json={"instances": [ROW], "return_probabilities": True}).json()
    assert "probabilities" not in plain and len(asked["probabilities"][0]) == 3
    assert [len(r.outputs["probabilities"][0]) for r in sink.records] == [3, 3]
    assert all("return_probabilities" not in r.inputs for r in sink.records)
    sink.records.clear()
    client.post("/v1/endpoints/flowers/predict", json={"instances": [ROW]})  # the default: as the caller asked
    assert "probabilities" not in sink.records[0].outputs
