"""The online read path (app/features/online.py) against Feast's own get_online_features, on the
local profile's SQLite store and on Redis; one pipelined round trip on Redis; the online route."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from app.errors import DependencyUnavailable, InvalidInput, NotFound
from app.features.online import OnlineReader
from app.features.repo import open_store
from app.settings import load_settings

REDIS_URL = "redis://127.0.0.1:6379/0"
N_VIEWS, N_FEATURES = 3, 10


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def feature_settings(home, kind: str, redis_url: str = REDIS_URL):
    """Settings of a fresh managed repo under ``home`` (own Feast project) on ``kind``."""
    settings = load_settings("local", matih_home=str(home), redis_url=redis_url)
    settings.features.project = "t_" + uuid.uuid4().hex[:12]
    settings.features.online_store = kind
    settings.features.engine = "local"
    return settings


def define(store, n_views: int = N_VIEWS, n_features: int = N_FEATURES, service: str = "svc"):
    """An entity ``customer`` (join key customer_id), views v0.. with features f<view>_<i> and a
    service over them; returns the views."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64

    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    source = FileSource(path=str(store.repo_path / "unused.parquet"), timestamp_field="ts")
    views = [
        FeatureView(name=f"v{v}", entities=[customer], ttl=timedelta(days=1), source=source, online=True,
                    schema=[Field(name="customer_id", dtype=Int64)]
                    + [Field(name=f"f{v}_{i}", dtype=Float64) for i in range(n_features)])
        for v in range(n_views)
    ]
    store.apply([customer, *views, FeatureService(name=service, features=views)])
    return views


def write(store, views, ids: list[int], ages_s: list[float], base: float = 0.0) -> datetime:
    """Online values: customer ids[j] gets f<v>_<i> = base + 100*j + i, event time now - ages_s[j]."""
    now = datetime.now(timezone.utc)
    for v, view in enumerate(views):
        n = len([f for f in view.features])
        df = pd.DataFrame({"customer_id": ids, "ts": [now - timedelta(seconds=a) for a in ages_s],
                           **{f"f{v}_{i}": [base + 100.0 * j + i for j in range(len(ids))] for i in range(n)}})
        store.write_to_online_store(view.name, df)
    return now


@pytest.fixture(params=["sqlite", "redis"])
def repo(request, tmp_path):
    if request.param == "redis" and not _redis_up():
        pytest.skip(f"no Redis at {REDIS_URL}")
    settings = feature_settings(tmp_path, request.param)
    store = open_store(settings)
    views = define(store)
    write(store, views, [1, 2], [0.0, 7200.0])
    return settings, store, views


def test_reader_matches_feast(repo):
    _, store, _ = repo
    rows = [{"customer_id": 1}, {"customer_id": 2}, {"customer_id": 3}]
    service = store.get_feature_service("svc")
    expected = store.get_online_features(features=service, entity_rows=rows).to_dict()
    got = OnlineReader(store, "svc").read({"customer_id": [1, 2, 3]})
    assert len(got.names) == N_VIEWS * N_FEATURES and set(got.names) == set(expected) - {"customer_id"}
    assert {n: got.values[n] for n in got.names} == {n: expected[n] for n in got.names}
    assert got.values["f2_9"] == [9.0, 109.0, None]
    assert got.view_of["f1_0"] == "v1" and got.entities == {"customer_id": [1, 2, 3]}

    refs = ["v0:f0_1", "v2:f2_3"]
    expected = store.get_online_features(features=refs, entity_rows=rows, full_feature_names=True).to_dict()
    got = asyncio.run(OnlineReader(store, refs, full_feature_names=True).read_async({"customer_id": [1, 2, 3]}))
    assert got.names == ["v0__f0_1", "v2__f2_3"]
    assert {n: got.values[n] for n in got.names} == {n: expected[n] for n in got.names}


def test_event_timestamps_per_view(repo):
    _, store, _ = repo
    got = OnlineReader(store, "svc").read({"customer_id": [2, 1, 3]})
    now = datetime.now(timezone.utc)
    for view in ("v0", "v1", "v2"):
        old, new, none = got.event_timestamps[view]
        assert 7100 < (now - old).total_seconds() < 7300 and (now - new).total_seconds() < 60 and none is None


def test_unknown_service_features_and_keys(repo):
    _, store, _ = repo
    with pytest.raises(NotFound, match="feature service 'nope'"):
        OnlineReader(store, "nope").read({"customer_id": [1]})
    with pytest.raises(InvalidInput):
        OnlineReader(store, ["v0:nope"]).read({"customer_id": [1]})
    with pytest.raises(InvalidInput, match="view:feature"):
        OnlineReader(store, ["v0.f0_1"]).read({"customer_id": [1]})
    with pytest.raises(InvalidInput, match="missing join key"):
        OnlineReader(store, "svc").read({"user_id": [1]})


def test_new_definitions_are_picked_up(repo):
    settings, store, views = repo
    reader = OnlineReader(store, "svc")
    assert len(reader.names) == N_VIEWS * N_FEATURES
    from feast import FeatureService

    store.apply([FeatureService(name="svc", features=[views[0]])])  # the service changes
    store.refresh_registry()
    assert len(reader.names) == N_FEATURES


def _hmget_calls(client) -> int:
    return int(client.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))


@pytest.mark.skipif(not _redis_up(), reason=f"no Redis at {REDIS_URL}")
def test_redis_reads_all_views_in_one_pipeline(tmp_path):
    """Every view and entity in one pipeline of HMGETs: Redis counts one HMGET per entity row, and
    the client sent them all in one write (redis-py's own send, observed, not replaced)."""
    import redis

    settings = feature_settings(tmp_path, "redis")
    store = open_store(settings)
    write(store, define(store), [1, 2], [0.0, 0.0])
    reader = OnlineReader(store, "svc")
    reader.read({"customer_id": [1]})  # resolved and connected
    admin = redis.Redis.from_url(REDIS_URL)
    for read in (lambda: reader.read({"customer_id": [1, 2]}),
                 lambda: asyncio.run(reader.read_async({"customer_id": [1, 2]}))):
        before = _hmget_calls(admin)
        sent: list[int] = []
        original = redis.connection.AbstractConnection.send_packed_command
        original_async = redis.asyncio.connection.AbstractConnection.send_packed_command

        def hmgets(command) -> int:
            parts = command if isinstance(command, (list, tuple)) else [command]
            return sum(bytes(p).count(b"HMGET") for p in parts)

        def count(self, command, *a, **k):
            sent.append(hmgets(command))
            return original(self, command, *a, **k)

        async def count_async(self, command, *a, **k):
            sent.append(hmgets(command))
            return await original_async(self, command, *a, **k)

        redis.connection.AbstractConnection.send_packed_command = count
        redis.asyncio.connection.AbstractConnection.send_packed_command = count_async
        try:
            out = read()
        finally:
            redis.connection.AbstractConnection.send_packed_command = original
            redis.asyncio.connection.AbstractConnection.send_packed_command = original_async
        assert out.values["f1_3"] == [3.0, 103.0]
        # the views share the entity, so Feast keeps them in one hash per key: one HMGET per entity
        # row with every view's fields, all of them in one write (one round trip)
        assert _hmget_calls(admin) - before == 2
        assert [n for n in sent if n] == [2]


def test_redis_down_is_503(tmp_path):
    settings = feature_settings(tmp_path, "redis", redis_url="redis://127.0.0.1:1/0")
    store = open_store(settings)
    define(store)
    with pytest.raises(DependencyUnavailable, match="Redis"):
        OnlineReader(store, "svc", timeout_s=0.5).read({"customer_id": [1]})
    with pytest.raises(DependencyUnavailable):
        asyncio.run(OnlineReader(store, "svc", timeout_s=0.5).read_async({"customer_id": [1]}))


# -- the route -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from app.bootstrap import prepare
    from tests.support import NoJobs, in_process_context

    settings = feature_settings(tmp_path_factory.mktemp("home"), "sqlite")
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    store = open_store(settings)
    write(store, define(store), [1], [0.0])
    with TestClient(create_app(ctx)) as client:
        _, token = ctx.store.create_token("p-user", "predictor", "admin")
        client.headers["Authorization"] = f"Bearer {token}"
        yield client
    ctx.store.dispose()


def test_online_route(api):
    r = api.post("/v1/features/online", json={"feature_service": "svc", "entities": {"customer_id": [1, 9]}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"]["customer_id"] == [1, 9] and body["results"]["f0_2"] == [2.0, None]
    assert body["statuses"]["f0_2"] == ["PRESENT", "NOT_FOUND"] and body["feature_views"]["f0_2"] == "v0"
    assert body["event_timestamps"]["v1"][0] is not None and body["event_timestamps"]["v1"][1] is None
    r = api.post("/v1/features/online", json={"features": ["v1:f1_4"], "entities": {"customer_id": [1]},
                                                "full_feature_names": True})
    assert r.status_code == 200 and r.json()["results"]["v1__f1_4"] == [4.0]
    for bad, field in [({"feature_service": "nope", "entities": {"customer_id": [1]}}, "feature_service"),
                       ({"features": ["v1:zz"], "entities": {"customer_id": [1]}}, "features"),
                       ({"feature_service": "svc", "entities": {"user": [1]}}, "entities")]:
        r = api.post("/v1/features/online", json=bad)
        assert r.status_code == 422 and field in r.text, r.text
    assert api.post("/v1/features/online", json={"entities": {"customer_id": [1]}}).status_code == 422


def test_views_on_two_entities_read_from_their_own_hashes(tmp_path):
    """A service over views of two entities: one HMGET per entity row and entity, each with only
    its views' fields; a view with nothing stored for a key reads None beside one that has values."""
    if not _redis_up():
        pytest.skip(f"no Redis at {REDIS_URL}")
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64, String

    settings = feature_settings(tmp_path, "redis")
    store = open_store(settings)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    product = Entity(name="product", join_keys=["sku"], value_type=ValueType.STRING)
    source = FileSource(path=str(store.repo_path / "unused.parquet"), timestamp_field="ts")
    cust = FeatureView(name="cust", entities=[customer], ttl=timedelta(days=1), source=source,
                       schema=[Field(name="customer_id", dtype=Int64), Field(name="spend", dtype=Float64)])
    cust2 = FeatureView(name="cust2", entities=[customer], ttl=timedelta(days=1), source=source,
                        schema=[Field(name="customer_id", dtype=Int64), Field(name="visits", dtype=Int64)])
    prod = FeatureView(name="prod", entities=[product], ttl=timedelta(days=1), source=source,
                       schema=[Field(name="sku", dtype=String), Field(name="price", dtype=Float64)])
    store.apply([customer, product, cust, cust2, prod, FeatureService(name="basket", features=[cust, cust2, prod])])
    now = datetime.now(timezone.utc)
    store.write_to_online_store("cust", pd.DataFrame({"customer_id": [1, 2], "ts": [now, now], "spend": [10.0, 20.0]}))
    store.write_to_online_store("cust2", pd.DataFrame({"customer_id": [2], "ts": [now], "visits": [5]}))
    store.write_to_online_store("prod", pd.DataFrame({"sku": ["a", "b"], "ts": [now, now], "price": [1.5, 2.5]}))
    entities = {"customer_id": [1, 2], "sku": ["b", "zz"]}
    reader = OnlineReader(store, "basket")
    for out in (reader.read(entities), asyncio.run(reader.read_async(entities))):
        assert out.values == {"spend": [10.0, 20.0], "visits": [None, 5], "price": [2.5, None]}
        assert out.event_timestamps["cust2"][0] is None and out.event_timestamps["prod"][1] is None
        feast = store.get_online_features(features=store.get_feature_service("basket"),
                                          entity_rows=[{"customer_id": 1, "sku": "b"}, {"customer_id": 2, "sku": "zz"}])
        expected = feast.to_dict()
        assert {k: expected[k] for k in ("spend", "visits", "price")} == out.values
    n, commands = reader._redis_commands(reader.resolve(), entities)
    assert n == 2 and len(commands) == 4  # (customer, product) x 2 rows; cust and cust2 share a hash
