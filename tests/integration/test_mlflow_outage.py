"""MLflow stopped while an endpoint keeps serving: last known good resolutions and loaded
models carry on, /ready says MLflow is down, and what truly needs MLflow fails with 503."""

import time

from tests.support import skops_iris_model

GOOD = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def test_serving_survives_an_mlflow_outage(platform, iris):
    ttl = platform.settings.serving.resolve_ttl_s
    with platform.client() as c:
        assert c.post("/v1/endpoints/iris/predict", json=GOOD).status_code == 200
        platform.mlflow.stop()
        try:
            time.sleep(ttl + 0.5)  # past every cache TTL: answers must come from last known good
            for _ in range(5):
                r = c.post("/v1/endpoints/iris/predict", json=GOOD)
                assert r.status_code == 200, r.text
                assert r.json()["model_version"] == "1" and r.json()["predictions"] == [0]
            ready = c.get("/ready")
            assert ready.status_code == 200
            body = ready.json()
            assert body["status"] == "degraded" and body["dependencies"]["mlflow"]["status"] == "down"
            assert "MLflow is unavailable" in body["dependencies"]["mlflow"]["error"]
            r = c.post("/v1/endpoints", json={"name": "during-outage", "target": "never-seen@champion"})
            assert r.status_code == 503 and r.json()["code"] == "dependency_unavailable"
            assert int(r.headers["retry-after"]) >= 1
            # a registration (checked and converted in a Ray task) gets the same 503 from there
            up = c.post("/v1/models/during-outage/versions", files={"file": ("m", skops_iris_model())},
                        data={"format": "skops"})
            assert up.status_code == 503 and up.json()["code"] == "dependency_unavailable", up.text
            assert int(up.headers["retry-after"]) >= 1
        finally:
            platform.mlflow.start()
        deadline = time.monotonic() + 30
        while c.get("/ready").json()["dependencies"]["mlflow"]["status"] != "up":
            assert time.monotonic() < deadline, "MLflow did not come back in /ready"
            time.sleep(0.5)
        assert c.post("/v1/endpoints/iris/predict", json=GOOD).status_code == 200
