"""``/v1/features/{entities,sources,views,services}`` over the in-process context and the local
profile's managed Feast repo (SQL registry on SQLite, SQLite online store, parquet files under
the data root): create, list, get, replace and delete each kind through Feast's apply; 422s
naming the field, 409s naming the users, refused definitions leaving the registry unchanged,
roles, the audit log."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from app.api.app import create_app
from app.bootstrap import prepare
from app.features.definitions import BATCH_SUFFIX, FeatureDefinitions
from app.features.repo import STREAM_KIND_TAG, STREAM_TOPIC_TAG, open_store
from app.features.specs import DTYPES
from app.settings import load_settings
from tests.support import NoJobs, in_process_context

E, S, V, F = "/v1/features/entities", "/v1/features/sources", "/v1/features/views", "/v1/features/services"


def write_driver_stats(path: Path, extra: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({
        "driver_id": [1, 2, 1],
        "conv_rate": [0.1, 0.2, 0.3],
        "trips": [3, 4, 5],
        "event_ts": pd.to_datetime(["2026-01-01", "2026-01-01", "2026-01-02"], utc=True),
        **(extra or {}),
    })
    df.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home),
                             features={"project": f"t_{uuid.uuid4().hex[:10]}", "engine": "local"})
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    app = create_app(ctx)
    data = Path(settings.storage.data_roots[0])
    write_driver_stats(data / "drivers.parquet")

    def client(role: str) -> TestClient:
        c = TestClient(app)
        _, token = ctx.store.create_token(f"{role}-user", role, "admin")
        c.headers["Authorization"] = f"Bearer {token}"
        return c

    class A:
        pass

    a = A()
    a.settings, a.ctx, a.data = settings, ctx, data
    a.dev, a.viewer = client("developer"), client("viewer")
    yield a
    ctx.store.dispose()


def names(client, url):
    r = client.get(url)
    assert r.status_code == 200, r.text
    return [o["name"] for o in r.json()["items"]]


def field_of(r):
    return r.json().get("details", {}).get("field")


ENTITY = {"name": "driver", "join_keys": ["driver_id"], "description": "a driver"}
SOURCE = {"name": "driver_stats", "kind": "file", "path": "drivers.parquet", "timestamp_field": "event_ts"}
VIEW = {"name": "driver_hourly", "entities": ["driver"], "source": "driver_stats", "ttl_s": 86400,
        "schema": [{"name": "conv_rate", "dtype": "Float64"}, {"name": "trips", "dtype": "Int64"}]}


def test_create_list_get_replace_and_delete_each_kind(api):
    r = api.dev.post(E, json=ENTITY)
    assert r.status_code == 201, r.text
    assert r.json()["join_keys"] == ["driver_id"] and r.json()["created_at"]
    assert api.dev.post(E, json={**ENTITY, "description": "the driver"}).status_code == 200  # replaced
    assert api.viewer.get(f"{E}/driver").json()["description"] == "the driver"

    r = api.dev.post(S, json=SOURCE)
    assert r.status_code == 201, r.text
    assert r.json()["path"] == str(api.data / "drivers.parquet") and r.json()["kind"] == "file"

    r = api.dev.post(V, json=VIEW)
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["schema"] == VIEW["schema"] and view["entities"] == ["driver"] and view["source"] == "driver_stats"
    assert view["ttl_s"] == 86400 and view["online"] is True and view["created_at"]
    assert view["entity_columns"] == [{"name": "driver_id", "dtype": "Int64"}]
    assert api.viewer.get(f"{E}/driver").json()["value_type"] == "INT64"  # typed from the view's column
    r = api.dev.post(V, json={**VIEW, "online": False})
    assert r.status_code == 200 and r.json()["online"] is False, r.text
    assert api.dev.post(V, json=VIEW).json()["online"] is True

    r = api.dev.post(F, json={"name": "driver_model", "features": ["driver_hourly:conv_rate"]})
    assert r.status_code == 201, r.text
    assert r.json()["features"] == ["driver_hourly:conv_rate"]
    r = api.dev.post(F, json={"name": "driver_model", "features": ["driver_hourly"]})
    assert r.status_code == 200 and r.json()["features"] == ["driver_hourly:conv_rate", "driver_hourly:trips"]

    assert names(api.viewer, E) == ["driver"] and names(api.viewer, S) == ["driver_stats"]
    assert names(api.viewer, V) == ["driver_hourly"] and names(api.viewer, F) == ["driver_model"]
    assert api.viewer.get(f"{E}/driver").json()["used_by"] == ["driver_hourly"]
    assert api.viewer.get(f"{V}/driver_hourly").json()["used_by"] == ["driver_model"]
    assert api.viewer.get(f"{V}/nope").status_code == 404

    # Feast's own SDK, in a fresh store over the same repo, sees the same objects
    fresh = open_store(api.settings, fresh=True)
    assert [v.name for v in fresh.list_feature_views()] == ["driver_hourly"]
    assert [s.name for s in fresh.list_feature_services()] == ["driver_model"]

    # deletion in dependency order; each one audited
    for url, name in ((F, "driver_model"), (V, "driver_hourly"), (S, "driver_stats"), (E, "driver")):
        r = api.dev.delete(f"{url}/{name}")
        assert r.status_code == 200 and r.json()["deleted"] == name, r.text
        assert api.dev.get(f"{url}/{name}").status_code == 404
    assert names(api.viewer, V) == [] and names(api.viewer, E) == []
    audit, _ = api.ctx.store.list_audit(limit=50)
    actions = [a["action"] for a in audit]
    assert "features.entity.apply" in actions and "features.service.delete" in actions, actions


def test_422s_name_the_field_and_leave_the_registry_unchanged(api):
    assert api.dev.post(E, json={"name": "rider", "join_keys": ["rider_id"]}).status_code == 201
    assert api.dev.post(S, json={**SOURCE, "name": "rides"}).status_code == 201
    before = {url: api.viewer.get(url).json() for url in (E, S, V, F)}

    cases = [
        (E, {"name": "9bad"}, "name"),
        (E, {"name": "x", "join_keys": ["a", "b"]}, "join_keys"),
        (E, {"name": "x", "tags": {"matih.stream.kind": "kafka"}}, "tags.matih.stream.kind"),
        (E, {"name": "x" + BATCH_SUFFIX}, "name"),
        (E, {"name": "x", "dtype": "Array(Int64)"}, "dtype"),
        (S, {**SOURCE, "name": "s1", "path": "/etc/passwd"}, "path"),
        (S, {**SOURCE, "name": "s1", "path": "missing.parquet"}, "path"),
        (S, {**SOURCE, "name": "s1", "timestamp_field": "nope"}, "timestamp_field"),
        (S, {**SOURCE, "name": "s1", "timestamp_field": "trips"}, "timestamp_field"),
        (S, {**SOURCE, "name": "s1", "stream": {"kind": "kafka", "topic": "t"}}, "stream"),
        (S, {**SOURCE, "name": "s1", "kind": "kinesis"}, "kind"),
        (V, {**VIEW, "name": "v1", "source": "rides", "entities": ["rider"]}, "entities[0]"),  # no rider_id column
        (V, {**VIEW, "name": "v1", "source": "rides", "entities": ["nobody"]}, "entities[0]"),
        (V, {**VIEW, "name": "v1", "entities": ["rider"], "source": "nowhere"}, "source"),
        (V, {**VIEW, "name": "v1", "source": "rides", "entities": [],
             "schema": [{"name": "conv_rate", "dtype": "Float64"}, {"name": "trips", "dtype": "Integer"}]},
         "schema[1].dtype"),
        (V, {**VIEW, "name": "v1", "source": "rides", "entities": [],
             "schema": [{"name": "conv_rate", "dtype": "Float64"}, {"name": "speed", "dtype": "Float64"}]},
         "schema[1].name"),
        (V, {**VIEW, "name": "v1", "source": "rides", "entities": [], "ttl_s": -1}, "ttl_s"),
        (V, {**VIEW, "name": "v1", "source": "rides", "entities": [],
             "schema": [{"name": "conv_rate", "dtype": "Int64"}]}, "schema[0].dtype"),  # a float column
        (V, {**VIEW, "name": "v1", "source": "rides", "entities": [],
             "schema": [{"name": "trips", "dtype": "Array(Int64)"}]}, "schema[0].dtype"),
        (F, {"name": "svc", "features": ["no_view"]}, "features[0]"),
        (F, {"name": "svc", "features": []}, "features"),
    ]
    for url, body, field in cases:
        r = api.dev.post(url, json=body)
        assert r.status_code == 422, (body, r.text)
        assert field_of(r) == field, (body, r.text)
    for url, body in before.items():
        assert api.viewer.get(url).json() == body

    # a view over the rides source with the rider entity needs a rider_id column: write it, then it applies
    write_driver_stats(api.data / "rides.parquet", {"rider_id": [7, 8, 9]})
    r = api.dev.post(S, json={**SOURCE, "name": "rides", "path": "rides.parquet"})
    assert r.status_code == 200, r.text
    r = api.dev.post(V, json={"name": "rider_view", "entities": ["rider"], "source": "rides", "ttl_s": 0,
                              "schema": [{"name": "trips", "dtype": "Int64"}]})
    assert r.status_code == 201, r.text
    r = api.dev.post(F, json={"name": "svc", "features": ["rider_view:trips", "rider_view:nope"]})
    assert r.status_code == 422 and field_of(r) == "features[1]", r.text
    assert names(api.viewer, F) == []


def test_409s_name_the_users(api):
    assert api.dev.post(E, json={"name": "car", "join_keys": ["driver_id"]}).status_code == 201
    assert api.dev.post(S, json={**SOURCE, "name": "cars"}).status_code == 201
    view = {**VIEW, "name": "car_view", "entities": ["car"], "source": "cars"}
    assert api.dev.post(V, json=view).status_code == 201
    assert api.dev.post(F, json={"name": "car_svc", "features": ["car_view:trips"]}).status_code == 201

    r = api.dev.post(E, json={"name": "car", "join_keys": ["car_id"]})
    assert r.status_code == 409 and r.json()["details"]["used_by"] == ["car_view"], r.text
    r = api.dev.post(E, json={"name": "car", "join_keys": ["driver_id"], "dtype": "String"})
    assert r.status_code == 409 and r.json()["details"]["field"] == "dtype", r.text
    r = api.dev.delete(f"{E}/car")
    assert r.status_code == 409 and "car_view" in r.json()["error"]
    r = api.dev.delete(f"{S}/cars")
    assert r.status_code == 409 and r.json()["details"]["used_by"] == ["car_view"]
    r = api.dev.delete(f"{V}/car_view")
    assert r.status_code == 409 and r.json()["details"]["used_by"] == ["car_svc"]
    r = api.dev.post(V, json={**view, "schema": [{"name": "conv_rate", "dtype": "Float64"}]})  # drops trips
    assert r.status_code == 409 and r.json()["details"]["used_by"] == ["car_svc"], r.text
    r = api.dev.post(S, json={**SOURCE, "name": "cars", "kind": "push"})
    assert r.status_code == 409 and r.json()["details"]["field"] == "kind", r.text
    # unchanged by all of that
    assert api.viewer.get(f"{E}/car").json()["join_keys"] == ["driver_id"]
    assert [f["name"] for f in api.viewer.get(f"{V}/car_view").json()["schema"]] == ["conv_rate", "trips"]
    assert api.viewer.get(f"{S}/cars").json()["kind"] == "file"

    # replacing the source (same kind, same columns) re-applies its view over the new path
    write_driver_stats(api.data / "cars2.parquet")
    r = api.dev.post(S, json={**SOURCE, "name": "cars", "path": "cars2.parquet"})
    assert r.status_code == 200, r.text
    fresh = open_store(api.settings, fresh=True)
    assert fresh.get_feature_view("car_view").batch_source.path == str(api.data / "cars2.parquet")


def test_push_source_with_a_stream_declaration(api):
    body = {"name": "clicks", "kind": "push", "path": "drivers.parquet", "timestamp_field": "event_ts",
            "stream": {"kind": "kafka", "topic": "clicks.v1"}}
    r = api.dev.post(S, json=body)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "push" and r.json()["stream"] == {"kind": "kafka", "topic": "clicks.v1"}
    assert "clicks" + BATCH_SUFFIX not in names(api.viewer, S)  # the batch source shows only inside its push source
    store = open_store(api.settings, fresh=True)
    push = store.get_data_source("clicks")
    assert type(push).__name__ == "PushSource"
    assert push.tags == {STREAM_KIND_TAG: "kafka", STREAM_TOPIC_TAG: "clicks.v1"}
    assert push.batch_source.path == str(api.data / "drivers.parquet")
    assert api.dev.post(E, json=ENTITY).status_code in (200, 201)
    r = api.dev.post(V, json={**VIEW, "name": "clicks_view", "source": "clicks", "schema": []})  # inferred schema
    assert r.status_code == 201, r.text
    assert {f["name"] for f in r.json()["schema"]} == {"conv_rate", "trips"} and r.json()["source"] == "clicks"
    assert store.get_feature_view("clicks_view").stream_source.name == "clicks"
    assert api.dev.delete(f"{V}/clicks_view").status_code == 200
    # unused, a source may change kind both ways; the push source's batch source goes with it
    r = api.dev.post(S, json={**body, "kind": "file", "stream": None})
    assert r.status_code == 200 and r.json()["kind"] == "file", r.text
    assert "clicks" + BATCH_SUFFIX not in [s.name for s in store.list_data_sources()]
    assert api.dev.post(S, json=body).json()["kind"] == "push"
    assert api.dev.delete(f"{S}/clicks").status_code == 200
    assert "clicks" + BATCH_SUFFIX not in [s.name for s in store.list_data_sources()]


def test_viewers_cannot_write(api):
    for url, body in ((E, ENTITY), (S, SOURCE), (V, VIEW), (F, {"name": "x", "features": ["v"]})):
        assert api.viewer.post(url, json=body).status_code == 403
        assert api.viewer.delete(f"{url}/x").status_code == 403
    assert api.viewer.get(E).status_code == 200
    assert TestClient(api.ctx and create_app(api.ctx)).get(E).status_code == 401


def test_openapi_documents_the_routes(api):
    paths = api.viewer.get("/openapi.json").json()["paths"]
    for url in (E, S, V, F):
        assert {"get", "post"} <= set(paths[url]) and {"get", "delete"} <= set(paths[url + "/{name}"])
    assert "Create or replace" in paths[V]["post"]["summary"]


def test_dtypes_map_to_feast_types():
    from app.features.specs import feast_dtypes

    assert set(feast_dtypes()) == set(DTYPES)
    assert FeatureDefinitions  # the service is importable without a store
