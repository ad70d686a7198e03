"""Feature enrichment on the shared platform (online store on Redis): definitions made with the
Feast SDK on the platform's managed repo, online values written to Redis, an endpoint that joins
them to each request, its answers, its stale/missing report and its prediction-log records."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from tests.support import wait_until

pytestmark = pytest.mark.integration

EP = "enriched"


@pytest.fixture(scope="module")
def enriched(platform) -> dict:
    import skops.io
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64
    from sklearn.linear_model import LinearRegression

    from app.features.repo import open_store

    store = open_store(platform.settings)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    source = FileSource(path=str(platform.home / "features-unused.parquet"), timestamp_field="ts")
    views = [FeatureView(name=f"en_{f}", entities=[customer], source=source, online=True, ttl=timedelta(days=1),
                         schema=[Field(name="customer_id", dtype=Int64), Field(name=f, dtype=Float64)])
             for f in ("spend", "visits")]
    store.apply([customer, *views, FeatureService(name="churn_v1", features=views)])
    now = datetime.now(timezone.utc)
    store.write_to_online_store("en_spend", pd.DataFrame({"customer_id": [1, 2], "ts": [now, now],
                                                          "spend": [120.0, 40.0]}))
    store.write_to_online_store("en_visits", pd.DataFrame({"customer_id": [1, 2], "ts": [now, now - timedelta(hours=3)],
                                                           "visits": [7.0, 2.0]}))
    rng = np.random.default_rng(0)
    X = pd.DataFrame({"spend": rng.uniform(0, 200, 60), "visits": rng.uniform(0, 10, 60), "extra": rng.normal(size=60)})
    est = LinearRegression().fit(X, 0.01 * X["spend"] - 0.3 * X["visits"] + X["extra"])
    with platform.client() as c:
        r = c.post("/v1/models/enriched-m/versions", files={"file": ("m.skops", skops.io.dumps(est))},
                   data={"format": "skops"})
        assert r.status_code == 201, r.text
        target = f"enriched-m/{r.json()['version']}"
        r = c.post("/v1/endpoints", json={"name": "enriched-bad", "target": target,
                                          "spec": {"features": {"service": "nope", "entity_keys": ["customer_id"]}}})
        assert r.status_code == 422 and "features.service" in r.text, r.text
        spec = {"features": {"service": "churn_v1", "entity_keys": ["customer_id"], "max_age_s": 3600,
                             "on_missing": "default", "defaults": {"spend": 0.0, "visits": 0.0}}}
        r = c.post("/v1/endpoints", json={"name": EP, "target": target, "spec": spec})
        assert r.status_code == 201, r.text
    return {"est": est}


def test_an_enriched_endpoint_joins_stored_features_reports_and_logs_them(platform, enriched):
    est = enriched["est"]
    with platform.client() as c:
        r = c.post("/v1/features/online", json={"feature_service": "churn_v1", "entities": {"customer_id": [1, 3]}})
        assert r.status_code == 200, r.text
        assert r.json()["results"]["spend"] == [120.0, None] and r.json()["statuses"]["visits"] == ["PRESENT", "NOT_FOUND"]

        rows = [{"customer_id": 1, "extra": 0.5}, {"customer_id": 2, "extra": -1.0}, {"customer_id": 3, "extra": 2.0}]
        r = c.post(f"/v1/endpoints/{EP}/predict", json={"instances": rows})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["features"] == {"stale": ["visits"], "missing": ["spend", "visits"]}
        # customer 2's visits are three hours old (stale -> default), customer 3 has nothing stored
        merged = pd.DataFrame({"spend": [120.0, 40.0, 0.0], "visits": [7.0, 0.0, 0.0], "extra": [0.5, -1.0, 2.0]})
        assert body["predictions"] == pytest.approx(est.predict(merged).tolist(), abs=1e-3)

        def logged():
            items = c.get(f"/v1/endpoints/{EP}/predictions").json()["items"]
            mine = sorted((i for i in items if i["request_id"] == body["request_id"]), key=lambda i: i["instance"])
            return mine if len(mine) == 3 else None

        mine = wait_until(logged, timeout=60, every=0.5)
        assert [i["features"] for i in mine] == [
            {"values": {"spend": 120.0, "visits": 7.0}},
            {"values": {"spend": 40.0, "visits": 0.0}, "stale": ["visits"]},
            {"values": {"spend": 0.0, "visits": 0.0}, "missing": ["spend", "visits"]},
        ]
        assert mine[0]["inputs"] == {"spend": 120.0, "visits": 7.0, "extra": 0.5}
