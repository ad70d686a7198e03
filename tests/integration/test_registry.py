"""The registry over HTTP on the real platform (Ray Serve, MLflow server, ModelServer
replicas): uploads served by both runtimes, stage rules, and a pickle that must never run."""

from __future__ import annotations

import pickle

from mlflow import MlflowClient

from tests.support import skops_iris_model

ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _upload(c, name: str, fmt: str, data: bytes):
    return c.post(f"/v1/models/{name}/versions", files={"file": ("m", data)}, data={"format": fmt})


def test_skops_upload_served_by_onnx_and_native_and_stage_rules(platform, iris):
    mlflow = MlflowClient(platform.settings.mlflow_tracking_uri)
    with platform.client() as c:
        r = _upload(c, "reg-skops", "skops", skops_iris_model())
        assert r.status_code == 201, r.text
        assert r.json()["formats"] == ["onnx", "skops"] and r.json()["validation"] == "passed"
        mv = mlflow.get_model_version("reg-skops", "1")
        assert mv.tags["matih.format"] == "skops" and mv.run_id

        for runtime in ("onnx", "native"):
            assert c.post("/v1/endpoints", json={"name": f"reg-{runtime}", "target": "reg-skops/1",
                                                 "runtime": runtime}).status_code == 201
            out = c.post(f"/v1/endpoints/reg-{runtime}/predict", json=ROW)
            assert out.status_code == 200 and out.json()["predictions"] == [0], out.text

        r = c.post("/v1/models/reg-skops/versions/1/stage", json={"stage": "production"})
        assert r.status_code == 409 and "approve" in r.json()["error"]
        assert c.post("/v1/models/reg-skops/versions/1/approve", json={"comment": "ok"}).status_code == 200
        assert c.post("/v1/models/reg-skops/versions/1/stage", json={"stage": "production"}).status_code == 200
        assert str(mlflow.get_model_version_by_alias("reg-skops", "production").version) == "1"
        assert c.post("/v1/endpoints", json={"name": "reg-prod", "target": "reg-skops@production"}).status_code == 201
        assert c.post("/v1/endpoints/reg-prod/predict", json=ROW).status_code == 200

        assert c.post("/v1/models/reg-skops/versions/1/stage", json={"stage": "archived"}).status_code == 200
        out = c.post("/v1/endpoints/reg-onnx/predict", json=ROW)  # invalidated in every replica at once
        assert out.status_code == 409 and "archived" in out.json()["error"], out.text
        assert c.post("/v1/endpoints/reg-prod/predict", json=ROW).status_code == 404  # the alias went with it
        card = c.get("/v1/models/reg-skops/versions/1/card").json()
        assert card["stage"] == "archived" and card["approvals"][0]["by"] == "admin"


def test_register_a_training_jobs_model_under_another_name(platform, iris):
    with platform.client() as c:
        r = c.post("/v1/models/iris-copy/versions", json={"job_id": iris["job_id"]})
        assert r.status_code == 201, r.text
        v = r.json()
        assert v["format"] == "onnx" and v["tags"]["matih.job_id"] == iris["job_id"]
        detail = c.get("/v1/models/iris-copy/versions/1").json()
        assert detail["metrics"]["accuracy"] > 0.85 and detail["lineage"]["run_id"] == iris["result"]["run_id"]


def test_a_pickle_never_runs_in_the_model_servers(platform):
    marker = platform.home / "pickle-ran"
    with platform.client() as c:
        r = _upload(c, "reg-evil", "sklearn-pickle", pickle.dumps(_Marker(str(marker))))
        assert r.status_code == 201, r.text
        assert r.json()["trusted"] is False
        for runtime, code in (("onnx", "no_onnx_artifact"), ("native", "untrusted_model")):
            assert c.post("/v1/endpoints", json={"name": f"evil-{runtime}", "target": "reg-evil/1",
                                                 "runtime": runtime}).status_code == 201
            out = c.post(f"/v1/endpoints/evil-{runtime}/predict", json=ROW)
            assert out.status_code == 409 and out.json()["code"] == code, out.text
        bad = c.post("/v1/models/reg-evil/versions", json={"source": "file:///etc/passwd", "format": "onnx"})
        assert bad.status_code == 422 and bad.json()["code"] == "unsafe_source"
        # Someone with write access to MLflow forges trust: the replicas still never unpickle it.
        MlflowClient(platform.settings.mlflow_tracking_uri).set_model_version_tag("reg-evil", "1", "matih.trusted",
                                                                                  "true")
        out = c.post("/v1/endpoints/evil-native/predict", json=ROW)
        assert out.status_code == 409 and out.json()["code"] == "untrusted_model", out.text
        # A benign pickle an admin trusts (the store's record, read by the replica) is served.
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        X, y = load_iris(return_X_y=True)
        r = _upload(c, "reg-evil", "sklearn-pickle", pickle.dumps(LogisticRegression(max_iter=300).fit(X, y)))
        assert r.status_code == 201 and r.json()["version"] == "2", r.text
        assert c.post("/v1/models/reg-evil/versions/2/trust").status_code == 200
        assert c.post("/v1/endpoints", json={"name": "evil-trusted", "target": "reg-evil/2",
                                             "runtime": "native"}).status_code == 201
        out = c.post("/v1/endpoints/evil-trusted/predict", json=ROW)
        assert out.status_code == 200 and out.json()["predictions"] == [0], out.text
    assert not marker.exists()


def test_registrations_convert_in_a_ray_task_and_its_errors_keep_their_status(platform, iris):
    """An upload's check and conversion run in a Ray task of their own, not in the Gateway;
    a refusal raised there reaches the client as the same 4xx."""
    import time

    from ray.util.state import list_tasks

    def finished_tasks() -> int:
        tasks = list_tasks(filters=[("func_or_class_name", "=", "_registry_task")], detail=True, limit=1000)
        return sum(1 for t in tasks if t.state in ("FINISHED", "FAILED"))

    before = finished_tasks()
    with platform.client() as c:
        r = _upload(c, "reg-task", "skops", skops_iris_model())
        assert r.status_code == 201, r.text
        assert r.json()["formats"] == ["onnx", "skops"] and r.json()["validation"] == "passed"
        bad = _upload(c, "reg-task", "skops", b"not a skops file")
        assert bad.status_code == 422, bad.text
        assert set(bad.json()) >= {"error", "code"}
        versions = c.get("/v1/models/reg-task/versions").json()["items"]
        assert [v["version"] for v in versions] == ["1"]  # the refused upload stored nothing
    deadline = time.monotonic() + 30  # the state API catches up with task events within seconds
    while finished_tasks() < before + 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert finished_tasks() >= before + 2
