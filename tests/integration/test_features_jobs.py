"""Feature store jobs on the session's platform (online store: Redis, engine: Feast's Ray compute
engine in the platform's cluster): materialization as a job, a point-in-time training set as a
job, and a training job on a feast:// dataset whose lineage and card name the features."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from app.features.repo import open_store

# Feast's Ray compute engine writes only rows newer than now - ttl: the data is recent.
T = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)
N = 40  # drivers


@pytest.fixture(scope="module")
def fs(platform):
    """A feature view over a parquet source and a feature service, applied with the Feast SDK
    to the platform's registry. Each driver has an old value (t-1h) and a future one (t+1h)."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64

    tag = uuid.uuid4().hex[:8]
    folder = platform.home / "data" / f"features_it_{tag}"
    folder.mkdir(parents=True)
    ids = list(range(1, N + 1))
    src = pd.DataFrame({
        "driver_id": ids * 2,
        "rate": [i / 100 for i in ids] + [0.99] * N,
        "trips": ids + [1000 + i for i in ids],
        "event_timestamp": [T - timedelta(hours=1)] * N + [T + timedelta(hours=1)] * N,
    })
    src.to_parquet(folder / "drivers.parquet", index=False)
    store = open_store(platform.settings, fresh=True)
    driver = Entity(name=f"driver_{tag}", join_keys=["driver_id"], value_type=ValueType.INT64)
    source = FileSource(name=f"drivers_{tag}", path=str(folder / "drivers.parquet"), timestamp_field="event_timestamp")
    view = FeatureView(name=f"stats_{tag}", entities=[driver], ttl=timedelta(hours=3), source=source,
                       schema=[Field(name="rate", dtype=Float64), Field(name="trips", dtype=Int64)])
    service = FeatureService(name=f"svc_{tag}", features=[view])
    store.apply([driver, source, view, service])
    # labels at t: 1 when the driver's rate (at t, the old value) is above 0.2
    entities = pd.DataFrame({"driver_id": ids, "event_timestamp": [T] * N, "label": [int(i > 20) for i in ids]})
    entities.to_parquet(folder / "entities.parquet", index=False)
    return {"store": store, "view": view.name, "service": service.name, "folder": folder}


def test_materialize_runs_the_ray_engine_in_the_cluster(platform, fs):
    with platform.client() as c:
        r = c.post("/v1/features/materialize", json={"views": [fs["view"]], "start": (T - timedelta(hours=2)).isoformat(),
                                                      "end": T.isoformat()})
        assert r.status_code == 202, r.text
    job = platform.wait_job(r.json()["job_id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], job.get("logs"))
    result = job["result"]
    assert result["engine"] == "ray" and result["rows_written"] == N
    assert result["views"][fs["view"]]["source_rows"] == N  # the t+1h rows lie after the window
    assert job["progress"]["rows_written"] == N and job["progress"]["views_done"] == 1
    online = fs["store"].get_online_features(features=[f"{fs['view']}:rate", f"{fs['view']}:trips"],
                                             entity_rows=[{"driver_id": 7}, {"driver_id": 33}]).to_dict()
    assert online["rate"] == [pytest.approx(0.07), pytest.approx(0.33)] and online["trips"] == [7, 33]


def test_historical_set_is_point_in_time_correct(platform, fs):
    with platform.client() as c:
        r = c.post("/v1/features/historical", json={"feature_service": fs["service"],
                                                   "entities": str(fs["folder"] / "entities.parquet")})
        assert r.status_code == 202, r.text
    job = platform.wait_job(r.json()["job_id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], job.get("logs"))
    result = job["result"]
    assert result["rows"] == N and result["feature_service"]["name"] == fs["service"]
    out = pd.read_parquet(result["output"]).set_index("driver_id").sort_index()
    assert list(out.index) == list(range(1, N + 1))
    assert (out["trips"] == out.index).all()  # the t-1h values, never the t+1h ones (1000 + id)
    assert out["rate"].max() < 0.99


def test_training_on_a_feast_dataset(platform, fs):
    spec = {"name": "fs-train", "register_as": f"fs-{fs['service']}".replace("_", "-"),
            "estimator": "sklearn.tree.DecisionTreeClassifier",
            "dataset": {"uri": f"feast://{fs['service']}?entities={fs['folder'] / 'entities.parquet'}",
                        "target": "label"}}
    with platform.client() as c:
        r = c.post("/v1/training/jobs", json=spec)
        assert r.status_code == 202, r.text
        job = platform.wait_job(r.json()["job_id"], timeout=300)
        assert job["status"] == "succeeded", (job["error"], job.get("logs"))
        name, version = job["result"]["model_name"], job["result"]["model_version"]
        mv = c.get(f"/v1/models/{name}/versions/{version}").json()
        assert mv["feature_names"] == ["rate", "trips"], mv
        service = mv["lineage"]["feature_service"]
        refs = [f"{fs['view']}:rate", f"{fs['view']}:trips"]
        assert service["name"] == fs["service"] and service["features"] == refs
        assert service["version"].startswith("sha256:")
        md = c.get(f"/v1/models/{name}/versions/{version}/card", params={"format": "markdown"}).text
        assert f"feature service: {fs['service']}" in md and all(f"- {ref}" in md for ref in refs)
