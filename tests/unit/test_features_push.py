"""app.features.push: rows checked against the feature view a push source feeds, converted
(ISO or epoch timestamps, the schema's types) and written through Feast's push API to the
online store (SQLite) and to the batch source's parquet file (Feast's file offline store
appends); 422s naming the field. A real managed repo per test module (SQLite registry)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from app.errors import InvalidInput
from app.features.push import push_rows, push_spec, to_timestamp
from app.features.repo import STREAM_KIND_TAG, STREAM_TOPIC_TAG, open_store
from app.settings import load_settings


def declare(store, data_dir, name: str, stream: tuple[str, str] | None = None) -> str:
    """An entity ``driver``, a FileSource with one row, a PushSource on it (stream tags when
    ``stream``) and a FeatureView ``<name>_fv`` (conv_rate float, trips int, city string)."""
    from feast import Entity, FeatureView, Field, FileSource, PushSource
    from feast.types import Float64, Int64, String

    path = data_dir / f"{name}.parquet"
    pd.DataFrame({
        "driver_id": pd.Series([0], dtype="int64"), "conv_rate": [0.0], "trips": pd.Series([0], dtype="int64"),
        "city": ["none"], "event_ts": pd.to_datetime(["2020-01-01T00:00:00Z"], utc=True),
    }).to_parquet(path)
    driver = Entity(name="driver", join_keys=["driver_id"])
    batch = FileSource(name=f"{name}_batch", path=str(path), timestamp_field="event_ts")
    tags = {STREAM_KIND_TAG: stream[0], STREAM_TOPIC_TAG: stream[1]} if stream else {}
    push = PushSource(name=name, batch_source=batch, tags=tags)
    fv = FeatureView(name=f"{name}_fv", entities=[driver], ttl=timedelta(days=3650), source=push,
                     schema=[Field(name="driver_id", dtype=Int64), Field(name="conv_rate", dtype=Float64),
                             Field(name="trips", dtype=Int64), Field(name="city", dtype=String)])
    store.apply([driver, batch, push, fv])
    return name


def online(store, name: str, ids: list[int]) -> list[dict]:
    got = store.get_online_features(
        features=[f"{name}_fv:conv_rate", f"{name}_fv:trips", f"{name}_fv:city"],
        entity_rows=[{"driver_id": i} for i in ids],
    ).to_dict()
    return [{k: got[k][j] for k in ("driver_id", "conv_rate", "trips", "city")} for j in range(len(ids))]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home),
                             features={"project": f"t_{uuid.uuid4().hex[:10]}", "engine": "local"})
    store = open_store(settings)
    store.data_dir = home  # where declare() puts the parquet files
    store.settings = settings
    declare(store, home, "trips")
    return store


@pytest.fixture(scope="module")
def api(store):
    """The API in-process: developer and viewer clients, and the context (``streams`` unset)."""
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from app.bootstrap import prepare
    from tests.support import NoJobs, in_process_context

    prepared = prepare(store.settings)
    ctx = in_process_context(store.settings, prepared.admin_token, NoJobs())
    app = create_app(ctx)
    clients = {}
    for role in ("developer", "viewer"):
        c = TestClient(app)
        _, token = ctx.store.create_token(f"{role}-user", role, "admin")
        c.headers["Authorization"] = f"Bearer {token}"
        clients[role] = c
    yield ctx, clients
    ctx.store.dispose()


def test_push_online_converts_timestamps_and_types(store):
    now = datetime.now(timezone.utc).replace(microsecond=0)
    rows = [
        {"driver_id": 1, "conv_rate": "0.5", "trips": 3.0, "city": "Oslo", "event_ts": now.isoformat()},
        {"driver_id": "2", "conv_rate": 1, "trips": "7", "city": 42, "event_ts": now.timestamp()},
        {"driver_id": 3, "conv_rate": None, "trips": 1, "city": "Rome",
         "event_ts": now.isoformat().replace("+00:00", "Z"), "extra": "ignored"},
    ]
    assert push_rows(store, "trips", rows) == {"push_source": "trips", "rows": 3, "to": "online",
                                               "views": ["trips_fv"]}
    got = online(store, "trips", [1, 2, 3, 4])
    assert got[0] == {"driver_id": 1, "conv_rate": 0.5, "trips": 3, "city": "Oslo"}
    assert got[1] == {"driver_id": 2, "conv_rate": 1.0, "trips": 7, "city": "42"}
    assert got[2]["trips"] == 1 and got[2]["conv_rate"] is None
    assert got[3]["trips"] is None  # never pushed

    # The same row again (a redelivery) changes nothing; a newer event replaces it. (Older events
    # lose to newer ones on Redis: tests/unit/test_features_streams.py; SQLite writes last-wins.)
    push_rows(store, "trips", rows[:1])
    assert online(store, "trips", [1])[0] == got[0]
    newer = {**rows[0], "trips": 9, "event_ts": (now + timedelta(seconds=1)).isoformat()}
    push_rows(store, "trips", [newer])
    assert online(store, "trips", [1])[0]["trips"] == 9


def test_push_offline_appends_to_the_batch_file(store):
    path = store.data_dir / "trips.parquet"
    before = pd.read_parquet(path)
    rows = [{"driver_id": 10 + i, "conv_rate": 0.1 * i, "trips": i, "city": "X", "event_ts": 1_700_000_000 + i}
            for i in range(5)]
    out = push_rows(store, "trips", rows, to="offline")
    assert out["rows"] == 5 and out["to"] == "offline"
    after = pd.read_parquet(path)
    assert len(after) == len(before) + 5
    assert set(after["driver_id"]) >= {10, 11, 12, 13, 14}
    assert online(store, "trips", [10])[0]["trips"] is None  # offline only

    push_rows(store, "trips", [{**rows[0], "driver_id": 20}], to="online_and_offline")
    assert len(pd.read_parquet(path)) == len(after) + 1
    assert online(store, "trips", [20])[0]["trips"] == 0


@pytest.mark.parametrize("kwargs, field, words", [
    ({"push_source": "nope"}, "push_source", "not a push source"),
    ({"to": "elsewhere"}, "to", "online_and_offline"),
    ({"rows": []}, "rows", "non-empty"),
    ({"rows": [{"driver_id": 1, "conv_rate": 1.0, "trips": 1, "city": "a"}]}, "rows[0].event_ts", "missing"),
    ({"rows": [{"driver_id": 1, "conv_rate": 1.0, "city": "a", "event_ts": 1}]}, "rows[0].trips", "missing"),
    ({"rows": [{"driver_id": 1, "conv_rate": 1.0, "trips": 1, "city": "a", "event_ts": 1},
               {"driver_id": 1, "conv_rate": "x", "trips": 1, "city": "a", "event_ts": 1}]},
     "rows[1].conv_rate", "could not convert"),
    ({"rows": [{"driver_id": 1, "conv_rate": 1.0, "trips": 1.5, "city": "a", "event_ts": 1}]},
     "rows[0].trips", "integer"),
    ({"rows": [{"driver_id": 1, "conv_rate": 1.0, "trips": 1, "city": "a", "event_ts": "yesterday"}]},
     "rows[0].event_ts", "neither ISO 8601"),
    ({"rows": ["not an object"]}, "rows[0].", "JSON object"),
])
def test_push_rejects_with_the_field(store, kwargs, field, words):
    args = {"push_source": "trips", "rows": [{"driver_id": 1}], "to": "online", **kwargs}
    with pytest.raises(InvalidInput) as err:
        push_rows(store, args["push_source"], args["rows"], args["to"])
    assert err.value.details["field"] == field
    assert words in err.value.message


def test_push_caps_rows(store):
    row = {"driver_id": 1, "conv_rate": 1.0, "trips": 1, "city": "a", "event_ts": 1}
    with pytest.raises(InvalidInput, match="more than the 3"):
        push_rows(store, "trips", [row] * 4, max_rows=3)


def test_spec_and_timestamps(store):
    spec = push_spec(store, "trips")
    assert spec.timestamp_field == "event_ts" and spec.views == ("trips_fv",)
    assert spec.columns == {"driver_id": "int", "conv_rate": "float", "trips": "int", "city": "str"}
    assert to_timestamp("2024-05-01T10:00:00") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert to_timestamp("1714557600") == to_timestamp(1714557600.0) == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        to_timestamp(True)


def test_push_route(api, store):
    _, c = api
    rows = [{"driver_id": 31, "conv_rate": 0.3, "trips": 31, "city": "Lima", "event_ts": "2026-01-01T00:00:00Z"}]
    r = c["developer"].post("/v1/features/push", json={"push_source": "trips", "rows": rows})
    assert r.status_code == 200, r.text
    assert r.json() == {"push_source": "trips", "rows": 1, "to": "online", "views": ["trips_fv"]}
    assert online(store, "trips", [31])[0]["trips"] == 31
    r = c["developer"].post("/v1/features/push", json={"push_source": "trips", "rows": [{"driver_id": 1}]})
    assert r.status_code == 422 and "rows[0].event_ts" in r.text
    r = c["developer"].post("/v1/features/push", json={"push_source": "nope", "rows": rows, "to": "offline"})
    assert r.status_code == 422 and "push_source" in r.text
    assert c["viewer"].post("/v1/features/push", json={"push_source": "trips", "rows": rows}).status_code == 403


def test_streams_route_lists_declarations_and_the_ingestor_state(api, store):
    from app.features.streams import Ingestor

    ctx, c = api
    declare(store, store.data_dir, "clicks", ("kafka", "clicks-topic"))
    r = c["viewer"].get("/v1/features/streams")
    assert r.status_code == 200, r.text
    item = {i["push_source"]: i for i in r.json()["items"]}["clicks"]
    assert item["state"] == "not_running" and item["kind"] == "kafka" and item["topic"] == "clicks-topic"

    # An in-process ingestor: without KAFKA_BOOTSTRAP_SERVERS the source cannot be consumed.
    ing = Ingestor(store.settings, store)
    ing.rescan()

    async def status():
        return ing.status()

    ctx.streams = status
    try:
        body = c["viewer"].get("/v1/features/streams").json()
    finally:
        ctx.streams = None
        ing.close()
    item = {i["push_source"]: i for i in body["items"]}["clicks"]
    assert item["state"] == "failed" and "KAFKA_BOOTSTRAP_SERVERS" in item["last_error"]
    assert "started_at" in body["ingestor"]
