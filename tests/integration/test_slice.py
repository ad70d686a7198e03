"""The first end-to-end slice through real components: Ray, MLflow, ONNX Runtime, Serve."""


from mlflow import MlflowClient

from tests.integration.conftest import IRIS_JOB


def test_health_ready_info_and_openapi(platform):
    with platform.client(token=None) as anon:
        assert anon.get("/health").json() == {"status": "ok"}
        ready = anon.get("/ready")
        assert ready.status_code == 200
        deps = ready.json()["dependencies"]
        assert ready.json()["status"] == "ok", deps
        assert {n: d["status"] for n, d in deps.items()} == {
            "metadata_store": "up", "mlflow": "up", "ray": "up", "job_scheduler": "up", "registry_cache": "up",
            "gpu_manager": "up",
        }
        schema = anon.get("/openapi.json").json()
        for path in ("/v1/training/jobs", "/v1/jobs/{job_id}", "/v1/endpoints", "/v1/endpoints/{name}/predict"):
            assert path in schema["paths"]
        assert anon.get("/docs").status_code == 200
    with platform.client() as c:
        info = c.get("/v1/info").json()
        assert info["profile"] == "local" and info["integrations"]["metadata_store"] == "sqlite"


def test_training_job_lifecycle_and_mlflow_registration(platform, iris):
    assert iris["status"] == "succeeded" and iris["attempts"] == 1
    res = iris["result"]
    assert res["model_name"] == "iris" and res["model_version"] == "1" and res["aliases"] == ["champion"]
    assert res["metrics"]["accuracy"] > 0.85
    assert res["onnx_max_abs_diff"] < 1e-4
    assert "registered iris version 1" in iris["logs"]
    # MLflow is the registry, not a copy: its own client sees the run, version, alias and tags.
    client = MlflowClient(platform.settings.mlflow_tracking_uri)
    mv = client.get_model_version_by_alias("iris", "champion")
    assert str(mv.version) == "1"
    assert float(mv.tags["matih.onnx_max_abs_diff"]) == res["onnx_max_abs_diff"]
    run = client.get_run(res["run_id"])
    assert run.data.params["max_iter"] == "300" and "accuracy" in run.data.metrics
    with platform.client() as c:
        listed = c.get("/v1/training/jobs").json()["items"]
        assert iris["job_id"] in [j["job_id"] for j in listed]
        assert c.get(f"/v1/training/jobs/{iris['job_id']}").json()["status"] == "succeeded"


def test_predict_rows_named_rows_and_columns(platform, iris):
    setosa, virginica = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
    names = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    with platform.client() as c:
        r = c.post("/v1/endpoints/iris/predict", json={"instances": [setosa, virginica]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["predictions"] == [0, 2]
        assert body["model"] == "iris" and body["model_version"] == "1" and body["endpoint"] == "iris"
        assert body["request_id"] and r.headers["x-request-id"] == body["request_id"]
        named = c.post("/v1/endpoints/iris/predict", json={"instances": [dict(zip(names, setosa))]})
        assert named.json()["predictions"] == [0]
        cols = c.post("/v1/endpoints/iris/predict",
                      json={"inputs": {n: [a, b] for n, a, b in zip(names, setosa, virginica)},
                            "return_probabilities": True})
        assert cols.json()["predictions"] == [0, 2] and len(cols.json()["probabilities"][0]) == 3


def test_endpoint_change_takes_effect_without_redeploy(platform, iris):
    from ray import serve

    before = serve.status().applications["matih"].last_deployed_time_s
    with platform.client() as c:
        job = platform.wait_job(c.post("/v1/training/jobs", json={**IRIS_JOB, "name": "iris-v2",
                                                                  "hyperparameters": {"max_iter": 100, "C": 0.1}}).json()["job_id"])
        new = job["result"]["model_version"]
        assert int(new) >= 2 and job["result"]["aliases"] == ["challenger"]  # champion stays on version 1
        r = c.post("/v1/endpoints", json={"name": "iris-pinned", "target": f"iris/{new}"})
        assert r.status_code == 201 and r.json()["model_version"] == new
        assert c.post("/v1/endpoints/iris-pinned/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).json()["model_version"] == new
        r = c.put("/v1/endpoints/iris-pinned", json={"target": "models:/iris/1"})
        assert r.status_code == 200
        assert c.post("/v1/endpoints/iris-pinned/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).json()["model_version"] == "1"
        assert c.delete("/v1/endpoints/iris-pinned").status_code == 204
        assert c.post("/v1/endpoints/iris-pinned/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 404
    app = serve.status().applications["matih"]
    assert app.status == "RUNNING"
    assert app.last_deployed_time_s == before  # nothing was redeployed


def test_audit_log_records_mutations(platform, iris):
    items = []
    with platform.client() as c:  # every page: the suite's other tests audit much besides
        for rtype in ("endpoint", "job"):
            token = None
            while True:
                page = c.get("/v1/audit", params={"limit": 1000, "resource_type": rtype,
                                                  **({"page_token": token} if token else {})}).json()
                items += page["items"]
                token = page.get("next_page_token")
                if not token:
                    break
    actions = {(i["action"], i["resource_id"]) for i in items}
    assert ("endpoint.create", "iris") in actions
    assert ("job.create", iris["job_id"]) in actions and ("job.succeeded", iris["job_id"]) in actions
    assert all(i["actor"] and i["at"] for i in items)
