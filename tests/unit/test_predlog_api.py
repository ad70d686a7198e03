"""The prediction-log routes on an in-process app: the real metadata store (SQLite), an
in-process prediction log behind the same control interface as the Gateway's actor, the
replica buffer shipping into it."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.api.app import ApiContext
from app.api.errors import install_error_handlers
from app.api.predlog import router, time_range
from app.auth import Authenticator
from app.errors import InvalidInput
from app.predlog.buffer import PredictionLogBuffer
from app.predlog.control import LocalPredictionLog, local_ship
from app.predlog.ids import new_request_id
from app.predlog.records import PredictionRecord
from app.predlog.service import PredictionLogService
from app.settings import load_settings
from app.store import MetadataStore

ADMIN = "matih-test-admin-token"


def record(endpoint="iris", caller="alice", ts=None) -> PredictionRecord:
    ts = time.time() if ts is None else ts
    return PredictionRecord(new_request_id(ts), ts, endpoint, "", "iris", "1", 2.0,
                            inputs={"instances": [[5.1, 3.5, 1.4, 0.2]]}, feature_names=["a", "b", "c", "d"],
                            outputs={"predictions": [0], "probabilities": [[0.9, 0.05, 0.05]]}, caller=caller)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home), admin_token=ADMIN)
    store = MetadataStore(settings.database_url)
    store.migrate()
    store.create_endpoint("iris", "iris@champion", "onnx", {}, "test")
    service = PredictionLogService(settings)
    ctx = ApiContext(settings=settings, store=store, registry=None, authenticator=Authenticator(settings, store, ADMIN),
                     predictor=None, jobs=None)
    ctx.predlog = LocalPredictionLog(service)
    ctx.prediction_buffer = PredictionLogBuffer.from_settings(settings, local_ship(service))
    app = FastAPI()  # the routes alone (create_app would need MLflow for the registry's routes)
    install_error_handlers(app)
    app.include_router(router(ctx))
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {ADMIN}"
    tokens = {role: store.create_token(role, role, "test")[1] for role in ("viewer", "predictor", "developer")}
    yield client, ctx, service, store, tokens


def log(ctx, service, records):
    for r in records:
        assert ctx.prediction_buffer.add(r)

    async def ship():
        await ctx.prediction_buffer.flush()

    asyncio.run(ship())
    service.flush()


def test_logged_predictions_page_by_page(api):
    client, ctx, service, _, tokens = api
    records = [record() for _ in range(5)]
    log(ctx, service, records)
    r = client.get("/v1/endpoints/iris/predictions", params={"limit": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 2 and body["next_page_token"]
    item = body["items"][0]
    assert item["inputs"] == {"a": 5.1, "b": 3.5, "c": 1.4, "d": 0.2} and item["prediction"] == 0
    assert item["probabilities"] == [0.9, 0.05, 0.05] and item["caller"] == "alice"
    ids = [i["request_id"] for i in body["items"]]
    token = body["next_page_token"]
    while token:
        page = client.get("/v1/endpoints/iris/predictions", params={"limit": 2, "page_token": token}).json()
        ids += [i["request_id"] for i in page["items"]]
        token = page["next_page_token"]
    assert sorted(ids) == sorted(r.request_id for r in records) and len(ids) >= 5
    viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
    assert client.get("/v1/endpoints/iris/predictions", headers=viewer).status_code == 403
    developer = {"Authorization": f"Bearer {tokens['developer']}"}
    assert client.get("/v1/endpoints/iris/predictions", headers=developer).status_code == 200


@pytest.mark.parametrize("params,field", [
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-13-01T00:00:00Z"}, "until"),
    ({"since": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00Z"}, "until"),
    ({"since": "2026-01-01T00:00:00Z", "until": "2026-12-01T00:00:00Z"}, "since"),
    ({"page_token": "nope"}, "page_token"),
])
def test_bad_reads_are_422(api, params, field):
    client = api[0]
    r = client.get("/v1/endpoints/iris/predictions", params=params)
    assert r.status_code == 422 and r.json()["details"]["field"] == field, r.text


def test_time_range_defaults_and_plus_turned_space():
    now = datetime(2026, 12, 3, 7, tzinfo=timezone.utc)
    assert time_range(None, None, now=now) == (now - timedelta(hours=24), now)
    start, _ = time_range("2026-12-03T05:00:00 00:00", None, now=now)
    assert start == datetime(2026, 12, 3, 5, tzinfo=timezone.utc)
    assert time_range(None, "2026-12-03T07:00", now=now + timedelta(days=100)) == (now - timedelta(hours=24), now)
    with pytest.raises(InvalidInput):
        time_range("2026-12-03T07:00:00Z", None, now=now + timedelta(days=32))  # since..now is too long


def test_unknown_endpoint_is_404_but_a_deleted_ones_log_is_readable(api):
    client, ctx, service, store, _ = api
    assert client.get("/v1/endpoints/nope/predictions").status_code == 404
    assert client.get("/v1/endpoints/nope/log/stats").status_code == 404
    assert client.post("/v1/endpoints/nope/predictions/erase", json={"caller": "x"}).status_code == 404
    store.create_endpoint("gone", "iris@champion", "onnx", {}, "test")
    log(ctx, service, [record("gone")])
    store.delete_endpoint("gone", "test")
    r = client.get("/v1/endpoints/gone/predictions")
    assert r.status_code == 200 and len(r.json()["items"]) == 1


def test_stats_count_what_the_buffer_dropped(api):
    client, ctx, service, _, tokens = api
    buffer = ctx.prediction_buffer
    capacity, buffer.capacity = buffer.capacity, 0
    try:
        assert not buffer.add(record())
    finally:
        buffer.capacity = capacity
    log(ctx, service, [record()])
    viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
    r = client.get("/v1/endpoints/iris/log/stats", headers=viewer)
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["dropped"] >= 1 and stats["replica"]["dropped"] >= 1
    assert stats["written"] == stats["received"] and stats["files"] >= 1 and stats["bytes"] > 0


def test_erase_by_ids_and_by_caller_is_admin_only_and_audited(api):
    client, ctx, service, store, tokens = api
    store.create_endpoint("erasable", "iris@champion", "onnx", {}, "test")
    mine = [record("erasable", caller="carol") for _ in range(3)]
    other = record("erasable", caller="dave")
    log(ctx, service, mine + [other])
    developer = {"Authorization": f"Bearer {tokens['developer']}"}
    path = "/v1/endpoints/erasable/predictions/erase"
    assert client.post(path, json={"caller": "carol"}, headers=developer).status_code == 403
    assert client.post(path, json={}).status_code == 422
    assert client.post(path, json={"caller": "carol", "request_ids": ["x"]}).status_code == 422
    assert client.post(path, json={"request_ids": []}).status_code == 422
    r = client.post(path, json={"request_ids": [mine[0].request_id]})
    assert r.status_code == 200 and r.json()["records_removed"] == 1, r.text
    r = client.post(path, json={"caller": "carol"})
    assert r.status_code == 200 and r.json()["records_removed"] == 2
    left = client.get("/v1/endpoints/erasable/predictions").json()["items"]
    assert [i["caller"] for i in left] == ["dave"]
    audit, _ = store.list_audit(resource_type="endpoint")
    assert [a["action"] for a in audit].count("predictions.erase") == 2


@pytest.mark.parametrize("since,until", [
    ("9999-12-31T23:30:00", "9999-12-31T23:59:00"),
    ("0001-01-01T00:00:00+14:00", None),
    ("2026-12-03T07:00:00+25:00", None),
])
def test_times_at_the_edges_are_422_not_500(api, since, until):
    params = {"since": since, **({"until": until} if until else {})}
    assert api[0].get("/v1/endpoints/iris/predictions", params=params).status_code == 422
