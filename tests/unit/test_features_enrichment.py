"""Feature enrichment (app/features/enrichment.py): the merge rules, on_missing and max_age_s, the
spec's checks at endpoint creation, and an enriched endpoint in process (SQLite online store)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from app.errors import InvalidInput
from app.features.enrichment import FeatureEnrichment, check_spec, merge
from app.features.online import OnlineReader, OnlineResult
from app.features.repo import open_store
from tests.unit.test_features_online import define, feature_settings

NOW = 1_800_000_000.0


def result(values: dict[str, list], stamps: dict[str, list], view_of: dict[str, str]) -> OnlineResult:
    to_dt = lambda t: None if t is None else datetime.fromtimestamp(t, tz=timezone.utc)  # noqa: E731
    return OnlineResult(list(values), values, {v: [to_dt(t) for t in ts] for v, ts in stamps.items()}, view_of,
                        rows=len(next(iter(values.values()))))


def spec(**kw) -> FeatureEnrichment:
    return FeatureEnrichment.model_validate({"service": "svc", "entity_keys": ["customer_id"], **kw})


# two rows: customer 1 fresh (10 s old), customer 2 with view b an hour old and no `x` stored
READ = result({"x": [1.0, None], "y": [2.0, 20.0]}, {"a": [NOW - 10, None], "b": [NOW - 10, NOW - 3600]},
              {"x": "a", "y": "b"})
ROWS = [{"customer_id": 1, "extra": 0.5}, {"customer_id": 2, "extra": 0.7}]


def test_merge_fresh_and_missing_with_null():
    done = merge(spec(on_missing="null"), ROWS, READ, now=NOW)
    assert done.rows == [{"extra": 0.5, "x": 1.0, "y": 2.0}, {"extra": 0.7, "x": None, "y": 20.0}]
    assert done.report == {"stale": [], "missing": ["x"]}
    assert done.used == [{"values": {"x": 1.0, "y": 2.0}}, {"values": {"x": None, "y": 20.0}, "missing": ["x"]}]


def test_max_age_makes_old_values_stale():
    done = merge(spec(on_missing="null", max_age_s=600), ROWS, READ, now=NOW)
    assert done.rows[1] == {"extra": 0.7, "x": None, "y": None}
    assert done.report == {"stale": ["y"], "missing": ["x"]}
    assert done.used[1] == {"values": {"x": None, "y": None}, "stale": ["y"], "missing": ["x"]}
    assert merge(spec(on_missing="null", max_age_s=7200), ROWS, READ, now=NOW).report["stale"] == []


def test_defaults_and_error():
    done = merge(spec(on_missing="default", max_age_s=600, defaults={"x": -1.0, "y": -2.0}), ROWS, READ, now=NOW)
    assert done.rows[1] == {"extra": 0.7, "x": -1.0, "y": -2.0} and done.rows[0]["y"] == 2.0
    with pytest.raises(InvalidInput) as err:
        merge(spec(max_age_s=600), ROWS, READ, now=NOW)
    assert err.value.details["entity"] == {"customer_id": 2}
    assert err.value.details["missing"] == ["x"] and err.value.details["stale"] == ["y"]
    assert "{'customer_id': 2}" in err.value.message and "'x'" in err.value.message


def test_request_values_win_and_entity_keys_the_model_takes_stay():
    rows = [{"customer_id": 2, "extra": 0.7, "x": 9.0, "y": 8.0}]
    one = result({"x": [None], "y": [20.0]}, {"a": [None], "b": [NOW]}, {"x": "a", "y": "b"})
    done = merge(spec(), rows, one, now=NOW, model_inputs=["customer_id", "extra", "x", "y"])
    assert done.rows == [{"customer_id": 2, "extra": 0.7, "x": 9.0, "y": 8.0}]  # no error: nothing was missing
    assert done.report == {"stale": [], "missing": []} and done.used == [{"values": {}}]


def test_spec_model():
    with pytest.raises(ValueError):
        FeatureEnrichment.model_validate({"service": "svc", "entity_keys": []})
    with pytest.raises(ValueError):
        spec(on_missing="zero")
    with pytest.raises(ValueError):
        spec(max_age_s=0)


def test_check_spec(tmp_path):
    store = open_store(feature_settings(tmp_path, "sqlite"))
    define(store, n_views=1, n_features=2)
    check_spec(spec(), OnlineReader(store, "svc"))
    for bad, field in [(spec(service="nope"), "features.service"),
                       (spec(entity_keys=["user_id"]), "features.entity_keys"),
                       (spec(on_missing="default", defaults={"f0_0": 0.0}), "features.defaults"),
                       (spec(defaults={"zz": 0.0}), "features.defaults")]:
        with pytest.raises(InvalidInput) as err:
            check_spec(bad, OnlineReader(store, bad.service))
        assert err.value.details["field"] == field, err.value.message


# -- an enriched endpoint, in process -------------------------------------------------------------
EP, PLAIN, MODEL = "enr-ep", "enr-plain", "enr-m"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from app.bootstrap import prepare
    from app.schemas import TrainingJobSpec
    from app.training.pipeline import train_sklearn
    from tests.support import NoJobs, in_process_context

    home = tmp_path_factory.mktemp("home")
    settings = feature_settings(home, "sqlite")
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    rng = np.random.default_rng(0)
    data = pd.DataFrame(rng.normal(size=(80, 3)), columns=["a", "b", "extra"])
    data["target"] = 2 * data["a"] - data["b"] + 0.5 * data["extra"]
    csv = home / "train.csv"
    data.to_csv(csv, index=False)
    job = {"name": MODEL, "estimator": "sklearn.linear_model.LinearRegression", "register_as": MODEL,
           "task": "regression", "dataset": {"uri": str(csv), "target": "target"}}
    train_sklearn(TrainingJobSpec.model_validate(job), settings, "j1", lambda *a: None)

    store = open_store(settings)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    source = FileSource(path=str(home / "unused.parquet"), timestamp_field="ts")
    views = [FeatureView(name=f"stats_{f}", entities=[customer], source=source, online=True, ttl=timedelta(days=1),
                         schema=[Field(name="customer_id", dtype=Int64), Field(name=f, dtype=Float64)])
             for f in ("a", "b")]
    store.apply([customer, *views, FeatureService(name="churn_v1", features=views)])
    now = datetime.now(timezone.utc)
    store.write_to_online_store("stats_a", pd.DataFrame({"customer_id": [1, 2], "ts": [now, now], "a": [1.5, 0.3]}))
    store.write_to_online_store("stats_b", pd.DataFrame({"customer_id": [1, 2], "ts": [now, now - timedelta(hours=2)],
                                                         "b": [-0.5, 0.9]}))
    with TestClient(create_app(ctx)) as client:
        _, token = ctx.store.create_token("dev", "developer", "admin")
        client.headers["Authorization"] = f"Bearer {token}"
        client.ctx = ctx
        yield client
    ctx.store.dispose()


def features(**kw) -> dict:
    return {"service": "churn_v1", "entity_keys": ["customer_id"], **kw}


def test_endpoint_create_checks_the_service(api):
    r = api.post("/v1/endpoints", json={"name": "enr-bad", "target": f"{MODEL}/1",
                                        "spec": {"features": features(service="nope")}})
    assert r.status_code == 422 and "features.service" in r.text, r.text
    r = api.post("/v1/endpoints", json={"name": "enr-bad", "target": f"{MODEL}/1",
                                        "spec": {"features": features(on_missing="default", defaults={"a": 0.0})}})
    assert r.status_code == 422 and "features.defaults" in r.text, r.text


def test_enriched_predictions(api):
    spec_ = {"features": features(max_age_s=3600, on_missing="default", defaults={"a": 0.0, "b": 0.0})}
    r = api.post("/v1/endpoints", json={"name": EP, "target": f"{MODEL}/1", "spec": spec_})
    assert r.status_code == 201, r.text
    assert api.post("/v1/endpoints", json={"name": PLAIN, "target": f"{MODEL}/1"}).status_code == 201

    r = api.post(f"/v1/endpoints/{EP}/predict", json={"instances": [{"customer_id": 1, "extra": 2.0},
                                                                     {"customer_id": 2, "extra": 1.0},
                                                                     {"customer_id": 3, "extra": 0.0}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["features"] == {"stale": ["b"], "missing": ["a", "b"]}
    # customer 2's b is two hours old (stale: default 0.0), customer 3 has nothing (defaults)
    merged = [{"a": 1.5, "b": -0.5, "extra": 2.0}, {"a": 0.3, "b": 0.0, "extra": 1.0}, {"a": 0.0, "b": 0.0, "extra": 0.0}]
    plain = api.post(f"/v1/endpoints/{PLAIN}/predict", json={"instances": merged}).json()
    assert "features" not in plain
    assert body["predictions"] == pytest.approx(plain["predictions"], abs=1e-5)
    assert body["predictions"][0] == pytest.approx(2 * 1.5 + 0.5 + 1.0, abs=1e-3)

    cols = api.post(f"/v1/endpoints/{EP}/predict", json={"inputs": {"customer_id": [1], "extra": [2.0]}}).json()
    assert cols["predictions"] == pytest.approx(body["predictions"][:1], abs=1e-5)
    r = api.post(f"/v1/endpoints/{EP}/predict", json={"instances": [{"extra": 2.0}]})
    assert r.status_code == 422 and "customer_id" in r.text

    ctx = api.ctx
    asyncio.run(ctx.prediction_buffer.flush())
    ctx.predlog.service.flush()
    items = api.get(f"/v1/endpoints/{EP}/predictions").json()["items"]
    first = [i for i in items if i["request_id"] == body["request_id"]]
    assert [i["features"] for i in sorted(first, key=lambda i: i["instance"])] == [
        {"values": {"a": 1.5, "b": -0.5}},
        {"values": {"a": 0.3, "b": 0.0}, "stale": ["b"]},
        {"values": {"a": 0.0, "b": 0.0}, "missing": ["a", "b"]},
    ]
    assert first[0]["inputs"] == {"a": 1.5, "b": -0.5, "extra": 2.0}


def test_v2_named_inputs_are_enriched(api):
    tensors = [{"name": "customer_id", "shape": [2], "datatype": "INT64", "data": [1, 2]},
               {"name": "extra", "shape": [2], "datatype": "FP32", "data": [2.0, 1.0]}]
    r = api.post(f"/v2/models/{EP}/infer", json={"inputs": tensors})
    assert r.status_code == 200, r.text
    body = r.json()
    assert json.loads(body["parameters"]["features"]) == {"stale": ["b"], "missing": []}
    plain = api.post(f"/v1/endpoints/{PLAIN}/predict", json={"instances": [{"a": 1.5, "b": -0.5, "extra": 2.0},
                                                                          {"a": 0.3, "b": 0.0, "extra": 1.0}]})
    assert body["outputs"][0]["data"] == pytest.approx(plain.json()["predictions"], abs=1e-5)


def test_on_missing_error_is_422(api):
    r = api.put(f"/v1/endpoints/{EP}", json={"spec": {"features": features(max_age_s=3600)}})
    assert r.status_code == 200, r.text
    deadline = time.time() + 10
    while True:  # the replica's endpoint cache (serving.resolve_ttl_s) may hold the old spec a moment
        r = api.post(f"/v1/endpoints/{EP}/predict", json={"instances": [{"customer_id": 2, "extra": 1.0}]})
        if r.status_code == 422 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 422 and "customer_id" in r.text and "stale" in r.text, r.text
    ok = api.post(f"/v1/endpoints/{EP}/predict", json={"instances": [{"customer_id": 2, "extra": 1.0, "b": 0.1}]})
    assert ok.status_code == 200 and ok.json()["features"] == {"stale": [], "missing": []}
