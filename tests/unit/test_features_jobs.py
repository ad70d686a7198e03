"""Feature store jobs (app/features/jobs.py) in-process on the local profile with Feast's local
engine: spec validation, the point-in-time set (no leakage of a future value, ttl honored),
materialization with row counts, and feast:// training frames."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from app.errors import InvalidInput, NotFound
from app.features.jobs import (
    HistoricalSpec,
    MaterializeSpec,
    check_feast_uri,
    check_historical_paths,
    check_views,
    load_feast_dataset,
    parse_spec,
    run_historical,
    run_materialize,
)
from app.features.repo import open_store
from app.settings import load_settings

T = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64

    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home), features={
        "engine": "local", "project": "t_" + uuid.uuid4().hex[:10]})
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    # driver 1: an old value (t-1h) and a future one (t+1h) around its entity row at t.
    # driver 2: only a value 3h before its row, older than the view's 2h ttl.
    # driver 3: a value 30 minutes before.
    src = pd.DataFrame({
        "driver_id": [1, 1, 2, 3],
        "rate": [0.1, 0.9, 0.5, 0.3],
        "trips": [10, 90, 50, 30],
        "event_timestamp": [T - timedelta(hours=1), T + timedelta(hours=1), T - timedelta(hours=3),
                            T - timedelta(minutes=30)],
    })
    src.to_parquet(data / "drivers.parquet", index=False)
    store = open_store(settings)
    driver = Entity(name="driver", join_keys=["driver_id"], value_type=ValueType.INT64)
    source = FileSource(name="drivers_src", path=str(data / "drivers.parquet"), timestamp_field="event_timestamp")
    view = FeatureView(name="driver_stats", entities=[driver], ttl=timedelta(hours=2), source=source,
                       schema=[Field(name="rate", dtype=Float64), Field(name="trips", dtype=Int64)])
    service = FeatureService(name="driver_svc", features=[view])
    store.apply([driver, source, view, service])
    entities = pd.DataFrame({"driver_id": [1, 2, 3], "event_timestamp": [T, T, T], "label": [1, 0, 1]})
    entities.to_parquet(data / "entities.parquet", index=False)
    return settings, store, data


def test_materialize_spec_validation(env):
    settings, store, _ = env
    ok = parse_spec(MaterializeSpec, {"start": "2026-01-01T00:00:00", "end": "2026-01-02T00:00:00"})
    assert ok.start.tzinfo is not None and not ok.incremental
    assert parse_spec(MaterializeSpec, {"incremental": True}).end is None
    cases = [
        ({"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}, "start"),
        ({"end": "2026-01-01T00:00:00Z"}, "start"),
        ({"start": "2026-01-01T00:00:00Z"}, "end"),
        ({"incremental": True, "start": "2026-01-01T00:00:00Z"}, "start"),
        ({"incremental": True, "bogus": 1}, "bogus"),
        ({"incremental": True, "views": ["a", "a"]}, "views"),
    ]
    for body, field in cases:
        with pytest.raises(InvalidInput) as err:
            parse_spec(MaterializeSpec, body)
        assert err.value.details["field"] == field, (body, err.value.message)
    with pytest.raises(InvalidInput) as err:
        check_views(store, ["driver_stats", "nope"])
    assert err.value.details["field"] == "views" and "nope" in err.value.message
    assert check_views(store, None) == ["driver_stats"]


def test_historical_spec_paths(env, tmp_path):
    settings, _, data = env
    spec = check_historical_paths(HistoricalSpec(feature_service="s", entities=str(data / "entities.parquet")),
                                  settings)
    assert spec.entities == str(data / "entities.parquet")
    with pytest.raises(InvalidInput) as err:
        check_historical_paths(HistoricalSpec(feature_service="s", entities=str(tmp_path / "x.parquet")), settings)
    assert err.value.details["field"] == "entities"
    with pytest.raises(InvalidInput) as err:
        check_historical_paths(HistoricalSpec(feature_service="s", entities=str(data / "entities.parquet"),
                                              output="/etc/out.parquet"), settings)
    assert err.value.details["field"] == "output"
    with pytest.raises(InvalidInput) as err:
        check_feast_uri("feast://svc", settings)
    assert err.value.details["field"] == "dataset.uri"


def test_historical_is_point_in_time_correct(env):
    settings, _, data = env
    lines = []
    result = run_historical(HistoricalSpec(feature_service="driver_svc", entities=str(data / "entities.parquet")),
                            settings, "job-h1", lambda progress, line=None: lines.append(line))
    assert result["rows"] == 3 and result["output"].endswith("job-h1.parquet")
    assert result["feature_service"]["features"] == ["driver_stats:rate", "driver_stats:trips"]
    assert result["feature_service"]["version"].startswith("sha256:")
    out = pd.read_parquet(result["output"]).set_index("driver_id").sort_index()
    assert set(out.columns) >= {"event_timestamp", "label", "rate", "trips"}
    # driver 1: the value of t-1h, not the one of t+1h
    assert out.loc[1, "rate"] == pytest.approx(0.1) and out.loc[1, "trips"] == 10
    # a naive join that takes each key's latest value (what a serving-time lookup does) leaks the future one
    src = pd.read_parquet(data / "drivers.parquet")
    naive = src.sort_values("event_timestamp").groupby("driver_id").last()
    assert naive.loc[1, "rate"] == pytest.approx(0.9)
    # driver 2: its only value is 3h old, past the 2h ttl: null
    assert pd.isna(out.loc[2, "rate"])
    assert out.loc[3, "rate"] == pytest.approx(0.3)
    assert any("wrote 3 rows" in (line or "") for line in lines)
    with pytest.raises(NotFound):
        run_historical(HistoricalSpec(feature_service="nope", entities=str(data / "entities.parquet")),
                       settings, "job-h2", lambda *a: None)


def test_feast_training_frame(env):
    settings, _, data = env
    uri = check_feast_uri(f"feast://driver_svc?entities={data / 'entities.parquet'}", settings)
    frame, lineage = load_feast_dataset(uri, settings)
    assert sorted(frame.columns) == ["label", "rate", "trips"]  # no driver_id, no event_timestamp
    assert len(frame) == 3 and lineage["name"] == "driver_svc"
    assert lineage["features"] == ["driver_stats:rate", "driver_stats:trips"]


def test_materialize_local_engine_counts_rows(env):
    settings, store, _ = env
    progress = []
    spec = parse_spec(MaterializeSpec, {"start": (T - timedelta(hours=4)).isoformat(),
                                        "end": (T + timedelta(hours=2)).isoformat()})
    result = run_materialize(spec, settings, "job-m1", lambda p, line=None: progress.append((p, line)))
    view = result["views"]["driver_stats"]
    assert view["source_rows"] == 4 and view["rows_written"] == 3 and result["rows_written"] == 3
    assert result["engine"] == "local"
    assert progress[-1][0] == {"views_done": 1, "views_total": 1, "rows_written": 3}
    online = store.get_online_features(features=["driver_stats:rate"],
                                       entity_rows=[{"driver_id": 1}, {"driver_id": 3}]).to_dict()
    assert online["rate"] == [pytest.approx(0.9), pytest.approx(0.3)]  # the latest in the window
    # incremental from where that one ended: nothing new
    again = run_materialize(parse_spec(MaterializeSpec, {"incremental": True,
                                                         "end": (T + timedelta(hours=3)).isoformat()}),
                            settings, "job-m2", lambda *a: None)
    assert again["views"]["driver_stats"]["start"] == (T + timedelta(hours=2)).isoformat()
    assert again["rows_written"] == 0


def test_routes_submit_jobs(env):
    """POST /v1/features/{materialize,historical}: 422 naming the field, 404 for an unknown
    service, 202 with a job of the right kind (developer role)."""
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from app.bootstrap import prepare
    from tests.support import NoJobs, in_process_context

    settings, _, data = env
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    try:
        with TestClient(create_app(ctx)) as c:
            _, token = ctx.store.create_token("dev-user", "developer", "admin")
            _, viewer = ctx.store.create_token("viewer-user", "viewer", "admin")
            c.headers["Authorization"] = f"Bearer {token}"
            r = c.post("/v1/features/materialize", json={"views": ["nope"], "incremental": True})
            assert r.status_code == 422 and "nope" in r.text and "views" in r.text, r.text
            r = c.post("/v1/features/materialize", json={"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"})
            assert r.status_code == 422 and "start" in r.text, r.text
            r = c.post("/v1/features/materialize", json={"incremental": True},
                       headers={"Authorization": f"Bearer {viewer}"})
            assert r.status_code == 403, r.text
            r = c.post("/v1/features/materialize", json={"views": ["driver_stats"], "incremental": True})
            assert r.status_code == 202, r.text
            job = ctx.store.get_job(r.json()["job_id"])
            assert job["kind"] == "feature_materialize" and job["spec"]["views"] == ["driver_stats"]
            r = c.post("/v1/features/historical", json={"feature_service": "nope",
                                                       "entities": str(data / "entities.parquet")})
            assert r.status_code == 404, r.text
            r = c.post("/v1/features/historical", json={"feature_service": "driver_svc", "entities": "/etc/passwd"})
            assert r.status_code == 422 and "entities" in r.text, r.text
            r = c.post("/v1/features/historical", json={"feature_service": "driver_svc",
                                                       "entities": str(data / "entities.parquet")})
            assert r.status_code == 202, r.text
            job = ctx.store.get_job(r.json()["job_id"])
            assert job["kind"] == "feature_historical" and job["spec"]["feature_service"] == "driver_svc"
    finally:
        ctx.store.dispose()


def test_training_on_a_feast_dataset_records_the_service(env):
    """A sklearn job on feast://driver_svc?entities=...: lineage and card name the service,
    its version and its features; entity keys and timestamps are no model inputs."""
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from app.bootstrap import prepare
    from app.schemas import TrainingJobSpec
    from app.training.pipeline import train_sklearn
    from app.training.spec import check_spec_paths
    from tests.support import NoJobs, in_process_context

    settings, _, data = env
    rows = 40
    entities = pd.DataFrame({"driver_id": [1 + i % 3 for i in range(rows)],
                             "event_timestamp": [T + timedelta(minutes=i) for i in range(rows)],
                             "label": [i % 2 for i in range(rows)]})
    entities.loc[entities.driver_id == 2, "driver_id"] = 3  # driver 2 has no value within the ttl
    entities.to_parquet(data / "train_entities.parquet", index=False)
    spec = TrainingJobSpec.model_validate({
        "name": "fs-train", "register_as": "fs-model", "estimator": "sklearn.tree.DecisionTreeClassifier",
        "dataset": {"uri": f"feast://driver_svc?entities={data / 'train_entities.parquet'}", "target": "label"}})
    spec = check_spec_paths(spec, settings)
    result = train_sklearn(spec, settings, "job-fs", lambda *a, **k: None)
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    try:
        with TestClient(create_app(ctx)) as c:
            c.headers["Authorization"] = f"Bearer {prepared.admin_token}"
            version = c.get(f"/v1/models/fs-model/versions/{result['model_version']}").json()
            assert version["feature_names"] == ["rate", "trips"], version
            service = version["lineage"]["feature_service"]
            assert service["name"] == "driver_svc"
            assert service["features"] == ["driver_stats:rate", "driver_stats:trips"]
            assert service["version"].startswith("sha256:")
            card = c.get(f"/v1/models/fs-model/versions/{result['model_version']}/card").json()
            assert card["data"]["feature_service"]["features"] == service["features"]
            md = c.get(f"/v1/models/fs-model/versions/{result['model_version']}/card?format=markdown").text
            assert "## Features" in md and "- driver_stats:trips" in md and "feature service: driver_svc" in md
    finally:
        ctx.store.dispose()
