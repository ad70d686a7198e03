"""The registry API without Ray: real MLflow on SQLite, real skops / skl2onnx / TorchScript /
ONNX Runtime, FastAPI's TestClient over the in-process context. Whatever the API creates is
checked through MLflow's own client."""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.support import in_process_context

from app.api.app import create_app
from app.bootstrap import prepare
from app.registry.mlflow_registry import ModelRegistry
from app.schemas import TrainingJobSpec
from app.settings import load_settings
from app.training.pipeline import train_sklearn

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]


class _NoJobs:
    """JobControl for a context that runs no jobs."""

    async def notify(self) -> None:
        pass

    async def cancel(self, job_id, actor):
        raise AssertionError("no jobs here")


class _Marker:
    """Unpickling this creates ``path``: proof that a pickle was (or was not) executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, _NoJobs())
    store = ctx.store
    app = create_app(ctx)

    def client(role: str | None = "admin") -> TestClient:
        c = TestClient(app)
        if role == "admin":
            c.headers["Authorization"] = f"Bearer {prepared.admin_token}"
        elif role:
            _, token = store.create_token(f"{role}-user", role, "admin")
            c.headers["Authorization"] = f"Bearer {token}"
        return c

    class R:
        pass

    r = R()
    r.settings, r.store, r.client, r.mlflow = settings, store, client, MlflowClient(settings.mlflow_tracking_uri)
    r.admin, r.dev, r.viewer = client("admin"), client("developer"), client("viewer")
    yield r
    store.dispose()


# -- tiny real models ---------------------------------------------------------------------------
def _iris():
    from sklearn.datasets import load_iris

    return load_iris(return_X_y=True)


def _logreg():
    from sklearn.linear_model import LogisticRegression

    X, y = _iris()
    return LogisticRegression(max_iter=300).fit(X, y)


def skops_bytes(model=None) -> bytes:
    import skops.io as sio

    return sio.dumps(model if model is not None else _logreg())


def onnx_bytes() -> bytes:
    from app.onnx.sklearn_export import to_onnx

    X, _ = _iris()
    return to_onnx(_logreg(), X, True).SerializeToString()


def torchscript_bytes(out: int = 3) -> bytes:
    import torch

    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, out)).eval())
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def upload(c: TestClient, name: str, fmt: str, data: bytes, **fields):
    return c.post(
        f"/v1/models/{name}/versions",
        files={"file": ("model.bin", data, "application/octet-stream")},
        data={"format": fmt, **{k: str(v) for k, v in fields.items()}},
    )


def counts(r, name: str) -> tuple[int, int]:
    """(versions of ``name``, runs in the platform experiment): what a refused request must not change."""
    exp = r.mlflow.get_experiment_by_name(r.settings.experiment_name)
    runs = len(r.mlflow.search_runs([exp.experiment_id], max_results=1000)) if exp else 0
    try:
        versions = len(r.mlflow.search_model_versions(f"name = '{name}'"))
    except Exception:
        versions = 0
    return versions, runs


def endpoint_predict(c: TestClient, endpoint: str, target: str, runtime: str = "onnx"):
    r = c.post("/v1/endpoints", json={"name": endpoint, "target": target, "runtime": runtime})
    assert r.status_code == 201, r.text
    return c.post(f"/v1/endpoints/{endpoint}/predict", json={"instances": [IRIS_ROW], "return_probabilities": True})


# -- registered models --------------------------------------------------------------------------
def test_models_create_list_patch_delete_visible_in_mlflow(reg):
    c = reg.dev
    for n in ("alpha", "beta", "gamma"):
        r = c.post("/v1/models", json={"name": n, "description": f"model {n}", "tags": {"team": "ml"}})
        assert r.status_code == 201, r.text
    assert c.post("/v1/models", json={"name": "alpha"}).status_code == 409
    assert c.post("/v1/models", json={"name": "bad name!"}).status_code == 422
    assert c.post("/v1/models", json={"name": "x", "tags": {"matih.stage": "production"}}).status_code == 422

    seen, token = [], None
    while True:
        page = c.get("/v1/models", params={"limit": 1, **({"page_token": token} if token else {})}).json()
        seen += [m["name"] for m in page["items"]]
        token = page["next_page_token"]
        if not token:
            break
    assert {"alpha", "beta", "gamma"} <= set(seen) and len(seen) == len(set(seen))

    r = c.patch("/v1/models/alpha", json={"description": "changed", "tags": {"owner": "me"}})
    assert r.status_code == 200 and r.json()["description"] == "changed"
    rm = reg.mlflow.get_registered_model("alpha")
    assert rm.description == "changed" and rm.tags["owner"] == "me" and rm.tags["team"] == "ml"

    assert reg.viewer.get("/v1/models/alpha").status_code == 200
    assert reg.viewer.delete("/v1/models/alpha").status_code == 403
    assert c.delete("/v1/models/alpha").status_code == 204
    assert c.get("/v1/models/alpha").status_code == 404
    audit = reg.admin.get("/v1/audit", params={"resource_type": "model"}).json()["items"]
    assert {"model.create", "model.update", "model.delete"} <= {a["action"] for a in audit}


# -- registration ----------------------------------------------------------------------------------
def test_register_from_run_and_from_job(reg):
    import mlflow.onnx

    spec = TrainingJobSpec.model_validate({
        "name": "iris-run", "estimator": "sklearn.linear_model.LogisticRegression",
        "hyperparameters": {"max_iter": 300}, "dataset": {"uri": "builtin://iris", "target": "target"},
    })
    res = train_sklearn(spec, reg.settings, "job-run-1", lambda *a: None)  # no register_as: a run only
    r = reg.dev.post("/v1/models/fromrun/versions", json={"run_id": res["run_id"], "artifact_path": "model"})
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["version"] == "1" and v["format"] == "onnx" and v["validation"] == "passed"
    mv = reg.mlflow.get_model_version("fromrun", "1")
    assert mv.run_id == res["run_id"] and mv.tags["matih.source_kind"] == "run"

    # an MLflow model under the run's own artifacts (the runs:/ layout)
    import tempfile

    from app.onnx.sklearn_export import to_onnx

    X, _ = _iris()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.onnx.save_model(to_onnx(_logreg(), X, True), f"{tmp}/m", save_as_external_data=False)
        exp = reg.mlflow.get_experiment_by_name(reg.settings.experiment_name)
        run = reg.mlflow.create_run(exp.experiment_id)
        reg.mlflow.log_artifacts(run.info.run_id, f"{tmp}/m", "nested/model")
    r = reg.dev.post("/v1/models/fromrun/versions", json={"run_id": run.info.run_id, "artifact_path": "nested/model"})
    assert r.status_code == 201, r.text
    assert reg.mlflow.get_model_version("fromrun", "2").source.endswith("/nested/model")
    assert endpoint_predict(reg.dev, "fromrun2", "fromrun/2").json()["predictions"] == [0]

    assert reg.dev.post("/v1/models/fromrun/versions", json={"run_id": run.info.run_id, "artifact_path": "nope"}).status_code == 404
    assert reg.dev.post("/v1/models/fromrun/versions", json={"run_id": run.info.run_id, "artifact_path": "../x"}).status_code == 422
    assert reg.dev.post("/v1/models/fromrun/versions", json={"run_id": "0" * 32}).status_code == 404
    quote = reg.dev.post("/v1/models/fromrun/versions", json={"run_id": run.info.run_id, "artifact_path": "m' OR name = 'x"})
    assert quote.status_code == 422 and quote.json()["details"]["field"] == "artifact_path"
    both = reg.dev.post("/v1/models/fromrun/versions", json={"run_id": run.info.run_id, "source": "/x"})
    assert both.status_code == 422 and "exactly one" in both.json()["error"]

    job = reg.store.create_job("training", "iris-run", spec.model_dump(mode="json"), "admin", job_id="job-run-1")
    r = reg.dev.post("/v1/models/fromrun/versions", json={"job_id": job["job_id"]})
    assert r.status_code == 409 and "queued" in r.json()["error"]
    reg.store.transition_job(job["job_id"], "running")
    reg.store.transition_job(job["job_id"], "succeeded", result=res)
    r = reg.dev.post("/v1/models/fromrun/versions", json={"job_id": job["job_id"]})
    assert r.status_code == 201, r.text
    detail = reg.viewer.get(f"/v1/models/fromrun/versions/{r.json()['version']}").json()
    assert detail["lineage"]["job_id"] == "job-run-1" and detail["metrics"]["accuracy"] > 0.8
    assert detail["lineage"]["dataset_uri"] == "builtin://iris" and detail["signature"]["inputs"]


def test_register_uploads_of_each_format_and_serve_them(reg):
    c = reg.dev
    exp = reg.mlflow.get_experiment_by_name(reg.settings.experiment_name)

    r = upload(c, "up", "onnx", onnx_bytes(), description="plain onnx")
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["format"], v["formats"], v["validation"]) == ("onnx", ["onnx"], "passed")

    r = upload(c, "up", "skops", skops_bytes())
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["formats"] == ["onnx", "skops"] and v["validation"] == "passed" and v["task"] == "classification"
    assert float(v["tags"]["matih.onnx_max_abs_diff"]) < 1e-4

    from sklearn.ensemble import RandomForestClassifier

    X, y = _iris()
    forest = RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(X, y)
    r = upload(c, "up", "skops", skops_bytes(forest))  # holds sklearn.tree._tree.Tree: on the allow-list
    assert r.status_code == 201, r.text
    assert json.loads(r.json()["tags"]["matih.skops_trusted_types"]) == ["sklearn.tree._tree.Tree"]

    r = upload(c, "up", "torchscript", torchscript_bytes(), task="classification")
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["formats"] == ["onnx", "torchscript"] and v["validation"] == "passed", v["tags"]

    r = upload(c, "up", "sklearn-pickle", pickle.dumps(_logreg()))
    assert r.status_code == 201, r.text
    v = r.json()
    assert (v["format"], v["trusted"], v["validation"]) == ("sklearn-pickle", False, "pending")
    assert "sklearn.linear_model._logistic.LogisticRegression" in json.loads(v["tags"]["matih.pickle_globals"])

    # every version is an MLflow version whose artifacts sit in a run of the platform experiment
    for mv in reg.mlflow.search_model_versions("name = 'up'"):
        run = reg.mlflow.get_run(mv.run_id)
        assert run.info.experiment_id == exp.experiment_id
        assert mv.source == run.info.artifact_uri + "/model"
        files = {a.path for a in reg.mlflow.list_artifacts(mv.run_id, "model")}
        assert "model/MLmodel" in files

    # serve: ONNX for onnx/skops/torchscript; native for skops and torchscript
    for version, runtime in (("1", "onnx"), ("2", "onnx"), ("2", "native"), ("3", "native"), ("4", "onnx"), ("4", "native")):
        out = endpoint_predict(c, f"up-{version}-{runtime}", f"up/{version}", runtime)
        assert out.status_code == 200, (version, runtime, out.text)
        if version != "4":
            assert out.json()["predictions"] == [0]
    a = c.post("/v1/endpoints/up-4-onnx/predict", json={"instances": [IRIS_ROW], "return_probabilities": True}).json()
    b = c.post("/v1/endpoints/up-4-native/predict", json={"instances": [IRIS_ROW], "return_probabilities": True}).json()
    assert a["predictions"] == b["predictions"]
    assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-5)

    onnx_only = endpoint_predict(c, "up-1-native", "up/1", "native")
    assert onnx_only.status_code == 409 and onnx_only.json()["code"] == "no_native_artifact"


def test_bad_uploads_are_refused_and_store_nothing(reg):
    from sklearn.linear_model import LogisticRegression

    c = reg.dev
    upload(c, "bad", "onnx", onnx_bytes())
    before = counts(reg, "bad")

    class Custom:
        pass

    X, y = _iris()
    est = LogisticRegression(max_iter=300).fit(X, y)
    est.extra = Custom()
    r = upload(c, "bad", "skops", skops_bytes(est))
    assert r.status_code == 422 and r.json()["code"] == "untrusted_types"
    assert "Custom" in r.json()["error"] and "registry.skops_trusted_types" in r.json()["error"]
    for fmt, data in (("onnx", b"not onnx"), ("skops", b"not a zip"), ("torchscript", b"nope"), ("sklearn-pickle", b"")):
        r = upload(c, "bad", fmt, data)
        assert r.status_code == 422, (fmt, r.text)
    assert upload(c, "bad", "tensorflow", b"x").status_code == 422
    assert reg.dev.post("/v1/models/bad/versions", files={"file": ("m", b"x")}).status_code == 422  # no format
    assert upload(reg.viewer, "bad", "onnx", onnx_bytes()).status_code == 403
    assert counts(reg, "bad") == before


def test_register_from_source_inside_the_root_and_every_bad_source(reg, tmp_path):
    import mlflow.onnx

    from app.onnx.sklearn_export import to_onnx

    root = reg.settings.artifact_root
    inside = os.path.join(root, "incoming")
    os.makedirs(inside, exist_ok=True)
    with open(os.path.join(inside, "model.onnx"), "wb") as fh:
        fh.write(onnx_bytes())
    X, _ = _iris()
    mlflow.onnx.save_model(to_onnx(_logreg(), X, True), os.path.join(inside, "mlmodel"), save_as_external_data=False)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, os.path.join(inside, "link-out"))

    c = reg.dev
    r = c.post("/v1/models/src/versions", json={"source": f"{inside}/model.onnx", "format": "onnx"})
    assert r.status_code == 201, r.text
    assert r.json()["tags"]["matih.source_kind"] == "uri"
    r = c.post("/v1/models/src/versions", json={"source": f"file://{inside}/mlmodel"})
    assert r.status_code == 201, r.text
    r = c.post("/v1/models/src/versions", json={"source": "incoming/model.onnx", "format": "onnx"})
    assert r.status_code == 201, r.text
    assert c.post("/v1/models/src/versions", json={"source": f"{inside}/model.onnx"}).status_code == 422  # no format

    before = counts(reg, "src")
    bad = [
        "file:///etc/passwd",
        "/etc/passwd",
        str(secret),
        f"{root}/../secret.txt",
        "../../etc/passwd",
        f"{inside}/%2e%2e/%2e%2e/etc/passwd",
        f"{inside}/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"{inside}/%252e%252e%252fetc%252fpasswd",
        f"{inside}\\..\\..\\etc\\passwd",
        f"{inside}/model.onnx#x",
        f"{inside}/model.onnx?x=1",
        f"file://evil.example{inside}/model.onnx",
        "http://127.0.0.1/model.onnx",
        "s3://bucket/model.onnx",
        "ftp://host/model.onnx",
        f"{inside}/link-out",
    ]
    for source in bad:
        r = c.post("/v1/models/src/versions", json={"source": source, "format": "onnx"})
        assert r.status_code == 422, (source, r.text)
        body = r.json()
        assert body["code"] == "unsafe_source" and body["details"]["field"] == "source", source
    assert c.post("/v1/models/src/versions", json={"source": f"{inside}/missing.onnx", "format": "onnx"}).status_code == 404
    assert counts(reg, "src") == before


# -- aliases, stages, approvals ----------------------------------------------------------------------
def test_aliases(reg):
    c = reg.dev
    upload(c, "al", "onnx", onnx_bytes())
    upload(c, "al", "onnx", onnx_bytes())
    r = c.put("/v1/models/al/aliases/champion", json={"version": 1})
    assert r.status_code == 200 and r.json()["previous_version"] is None
    r = c.put("/v1/models/al/aliases/champion", json={"version": "2"})
    assert r.json()["previous_version"] == "1"
    assert str(reg.mlflow.get_model_version_by_alias("al", "champion").version) == "2"
    assert c.get("/v1/models/al").json()["aliases"] == {"champion": "2"}
    assert c.get("/v1/models/al/versions/2").json()["aliases"] == ["champion"]
    assert c.put("/v1/models/al/aliases/production", json={"version": 1}).status_code == 409
    assert c.put("/v1/models/al/aliases/latest", json={"version": 1}).status_code == 422
    assert c.put("/v1/models/al/aliases/champion", json={"version": 9}).status_code == 404
    assert reg.viewer.put("/v1/models/al/aliases/x", json={"version": 1}).status_code == 403
    assert c.delete("/v1/models/al/aliases/champion").status_code == 204
    assert c.delete("/v1/models/al/aliases/champion").status_code == 404
    assert reg.mlflow.get_registered_model("al").aliases == {}


def test_stage_rules_approvals_and_archived_versions(reg):
    c, admin = reg.dev, reg.admin
    upload(c, "st", "onnx", onnx_bytes())  # v1
    upload(c, "st", "onnx", onnx_bytes())  # v2
    upload(c, "st", "sklearn-pickle", pickle.dumps(_logreg()))  # v3: pickle, validation pending

    r = c.post("/v1/models/st/versions/1/stage", json={"stage": "production"})
    assert r.status_code == 409 and r.json()["code"] == "illegal_transition"
    assert "approve" in r.json()["error"]
    assert c.post("/v1/models/st/versions/1/approve").status_code == 403  # developers cannot approve
    r = admin.post("/v1/models/st/versions/1/approve", json={"comment": "looks good"})
    assert r.status_code == 200 and r.json()["approved_by"] == "admin"
    r = c.post("/v1/models/st/versions/1/stage", json={"stage": "production"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "production" and r.json()["aliases"] == ["production"]
    mv = reg.mlflow.get_model_version_by_alias("st", "production")
    assert str(mv.version) == "1" and mv.tags["matih.stage"] == "production" and mv.tags["matih.approved_by"] == "admin"
    assert endpoint_predict(c, "st-v1", "st/1").status_code == 200  # served while in production

    r = c.post("/v1/models/st/versions/3/stage", json={"stage": "production"})
    assert r.status_code == 409
    missing = " ".join(r.json()["details"]["missing"])
    assert "validation" in missing and "approval" in missing and "trust" in missing

    assert c.post("/v1/models/st/versions/2/stage", json={"stage": "staging"}).json()["aliases"] == ["staging"]
    admin.post("/v1/models/st/versions/2/approve")
    r = c.post("/v1/models/st/versions/2/stage", json={"stage": "production", "archive_existing": True})
    assert r.status_code == 200 and r.json()["aliases"] == ["production"]  # staging alias left with it
    old = reg.mlflow.get_model_version("st", "1")
    assert old.tags["matih.stage"] == "archived"
    assert {a: str(v) for a, v in reg.mlflow.get_registered_model("st").aliases.items()} == {"production": "2"}

    out = c.post("/v1/endpoints/st-v1/predict", json={"instances": [IRIS_ROW]})  # the endpoint made before
    assert out.status_code == 409 and "archived" in out.json()["error"]
    assert c.post("/v1/endpoints", json={"name": "st-archived-2", "target": "st/1"}).status_code == 409
    assert c.put("/v1/models/st/aliases/champion", json={"version": 1}).status_code == 409
    r = c.post("/v1/models/st/versions/1/stage", json={"stage": "production"})
    assert r.status_code == 409 and "staging first" in r.json()["error"]
    assert c.post("/v1/models/st/versions/1/stage", json={"stage": "staging"}).status_code == 200  # restore
    assert c.post("/v1/models/st/versions/1/stage", json={"stage": "bogus"}).status_code == 422

    actions = {a["action"] for a in admin.get("/v1/audit", params={"resource_type": "model_version"}).json()["items"]}
    assert {"model_version.approve", "model_version.stage.production", "model_version.stage.archived"} <= actions


def test_production_rules_are_configurable(reg):
    from app.registry.service import RegistryService

    settings = reg.settings.model_copy(deep=True)
    settings.registry.production_requires_approval = False
    svc = RegistryService(settings, ModelRegistry(settings), reg.store)
    upload(reg.dev, "cfg", "onnx", onnx_bytes())
    assert svc.set_stage("cfg", "1", "production", "tester")["stage"] == "production"


def test_endpoint_blocks_model_delete(reg):
    upload(reg.dev, "inuse", "onnx", onnx_bytes())
    assert reg.dev.post("/v1/endpoints", json={"name": "inuse-ep", "target": "inuse/1"}).status_code == 201
    r = reg.dev.delete("/v1/models/inuse")
    assert r.status_code == 409 and "inuse-ep" in r.json()["error"]
    assert reg.dev.delete("/v1/endpoints/inuse-ep").status_code == 204
    assert reg.dev.delete("/v1/models/inuse").status_code == 204


# -- cards and comparison ----------------------------------------------------------------------------
def test_training_tags_card_and_compare(reg):
    base = {
        "name": "card", "estimator": "sklearn.linear_model.LogisticRegression",
        "dataset": {"uri": "builtin://iris", "target": "target"}, "register_as": "card",
    }
    train_sklearn(TrainingJobSpec.model_validate({**base, "hyperparameters": {"max_iter": 300}}), reg.settings, "job-c1", lambda *a: None)
    train_sklearn(TrainingJobSpec.model_validate({**base, "hyperparameters": {"max_iter": 300, "C": 0.1}}), reg.settings, "job-c2", lambda *a: None)
    mv = reg.mlflow.get_model_version("card", "1")
    assert mv.tags["matih.validation"] == "passed" and len(mv.tags["matih.dataset_sha256"]) == 64
    assert mv.tags["matih.code_version"].startswith(("git:", "matih-ml "))
    assert mv.tags["matih.dataset_sha256"] == reg.mlflow.get_model_version("card", "2").tags["matih.dataset_sha256"]

    r = reg.dev.patch("/v1/models/card/versions/1", json={"description": "iris classifier", "intended_use": "demos only"})
    assert r.status_code == 200
    mv = reg.mlflow.get_model_version("card", "1")
    assert mv.description == "iris classifier" and mv.tags["matih.intended_use"] == "demos only"
    reg.admin.post("/v1/models/card/versions/1/approve", json={"comment": "ok"})

    card = reg.viewer.get("/v1/models/card/versions/1/card").json()
    assert card["description"] == "iris classifier" and card["intended_use"] == "demos only"
    assert card["metrics"]["accuracy"] > 0.8 and card["params"]["estimator"].endswith("LogisticRegression")
    assert card["data"]["dataset_uri"] == "builtin://iris" and len(card["data"]["dataset_sha256"]) == 64
    assert card["lineage"]["job_id"] == "job-c1" and card["lineage"]["run_id"] and card["lineage"]["code_version"]
    assert card["signature"]["inputs"] and card["format"] == "onnx" and card["parity"]["validation"] == "passed"
    assert card["parity"]["onnx_max_abs_diff"] < 1e-4 and card["approvals"][0]["by"] == "admin"
    md = reg.viewer.get("/v1/models/card/versions/1/card", params={"format": "markdown"})
    assert md.headers["content-type"].startswith("text/markdown") and "## Intended use" in md.text

    cmp = reg.viewer.get("/v1/models/card/compare", params={"versions": "1,2"}).json()
    assert set(cmp["metrics"]["accuracy"]) == {"1", "2"}
    assert cmp["params"]["C"] == {"1": None, "2": "0.1"} and "C" in cmp["differing_params"]
    assert reg.viewer.get("/v1/models/card/compare", params={"versions": "1"}).status_code == 422
    assert reg.viewer.get("/v1/models/card/compare", params={"versions": "1,x"}).status_code == 422
    assert reg.viewer.get("/v1/models/card/compare", params={"versions": "1,99"}).status_code == 404

    items = reg.viewer.get("/v1/models/card/versions", params={"limit": 1}).json()
    assert [v["version"] for v in items["items"]] == ["2"] and items["next_page_token"]
    nxt = reg.viewer.get("/v1/models/card/versions", params={"limit": 1, "page_token": items["next_page_token"]}).json()
    assert [v["version"] for v in nxt["items"]] == ["1"]


def test_experiments_and_runs(reg):
    exps = reg.viewer.get("/v1/experiments").json()["items"]
    exp = next(e for e in exps if e["name"] == reg.settings.experiment_name)
    runs = reg.viewer.get(f"/v1/experiments/{exp['experiment_id']}/runs", params={"limit": 2}).json()
    assert len(runs["items"]) <= 2
    if runs["items"]:
        run = reg.viewer.get(f"/v1/runs/{runs['items'][0]['run_id']}").json()
        assert run["experiment_id"] == exp["experiment_id"]
    assert reg.viewer.get("/v1/runs/" + "0" * 32).status_code == 404
    assert reg.viewer.get("/v1/experiments/999999/runs").status_code == 404


# -- THE PICKLE TEST ---------------------------------------------------------------------------------
def test_a_pickle_is_never_unpickled_unless_trusted(reg, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)))
    c, admin = reg.dev, reg.admin

    r = upload(c, "evil", "sklearn-pickle", payload)
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["trusted"] is False and not marker.exists()
    assert any("open" in g for g in json.loads(v["tags"]["matih.pickle_globals"]))
    mv = reg.mlflow.get_model_version("evil", v["version"])
    assert mv.tags["matih.format"] == "sklearn-pickle" and mv.tags["matih.trusted"] == "false"

    onnx = endpoint_predict(c, "evil-onnx", "evil/1", "onnx")
    assert onnx.status_code == 409 and onnx.json()["code"] == "no_onnx_artifact", onnx.text
    native = endpoint_predict(c, "evil-native", "evil/1", "native")
    assert native.status_code == 409 and native.json()["code"] == "untrusted_model", native.text
    assert "trust" in native.json()["error"]
    assert c.post("/v1/models/evil/versions/1/convert").status_code == 409
    assert c.post("/v1/models/evil/versions/1/stage", json={"stage": "production"}).status_code == 409
    assert c.post("/v1/models/evil/versions/1/trust").status_code == 403  # only an admin trusts
    assert c.get("/v1/models/evil/versions/1/card").status_code == 200
    assert not marker.exists()

    # the same path with a benign pickle, trusted by an admin: native serves it, convert makes ONNX
    r = upload(c, "evil", "sklearn-pickle", pickle.dumps(_logreg()))
    assert r.status_code == 201
    r = admin.post("/v1/models/evil/versions/2/trust")
    assert r.status_code == 200 and r.json()["trusted"] is True
    assert reg.mlflow.get_model_version("evil", "2").tags["matih.trusted"] == "true"
    out = endpoint_predict(c, "evil2-native", "evil/2", "native")
    assert out.status_code == 200 and out.json()["predictions"] == [0], out.text
    r = c.post("/v1/models/evil/versions/2/convert")
    assert r.status_code == 201, r.text
    conv = r.json()
    assert conv["format"] == "onnx" and conv["validation"] == "passed" and conv["tags"]["matih.converted_from"] == "2"
    assert endpoint_predict(c, "evil3-onnx", f"evil/{conv['version']}").json()["predictions"] == [0]
    assert not marker.exists()
    pickle.loads(payload)  # the probe itself works: unpickling it does create the marker
    assert marker.exists()


def test_trust_is_only_for_pickles(reg):
    upload(reg.dev, "tr", "onnx", onnx_bytes())
    r = reg.admin.post("/v1/models/tr/versions/1/trust")
    assert r.status_code == 409 and "only pickle-based" in r.json()["error"]


def test_torchscript_without_width_hint_uses_first_weight_and_regression(reg):
    r = upload(reg.dev, "tsreg", "torchscript", torchscript_bytes(out=1))
    assert r.status_code == 201, r.text
    v = r.json()
    assert v["task"] == "regression" and v["validation"] == "passed"
    a = endpoint_predict(reg.dev, "tsreg-onnx", "tsreg/1").json()
    b = endpoint_predict(reg.dev, "tsreg-native", "tsreg/1", "native").json()
    assert abs(a["predictions"][0] - b["predictions"][0]) < 1e-4


def test_openapi_documents_the_registry(reg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = reg.viewer.get("/openapi.json").json()
    paths = spec["paths"]
    for p in ("/v1/models", "/v1/models/{name}/versions", "/v1/models/{name}/versions/{version}/card",
              "/v1/models/{name}/compare", "/v1/experiments", "/v1/runs/{run_id}"):
        assert p in paths, p
    body = paths["/v1/models/{name}/versions"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "application/json" in body


def test_register_from_a_run_outside_the_artifact_root_is_refused(reg, tmp_path):
    """A run of an experiment whose artifacts live outside the artifact root: 422 before any
    download (register_from_run reads only under the artifact root)."""
    import tempfile

    import mlflow.onnx

    from app.onnx.sklearn_export import to_onnx

    X, _ = _iris()
    outside = tmp_path / "elsewhere"
    exp_id = reg.mlflow.create_experiment("outside-root", artifact_location=str(outside))
    run = reg.mlflow.create_run(exp_id)
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.onnx.save_model(to_onnx(_logreg(), X, True), f"{tmp}/m", save_as_external_data=False)
        reg.mlflow.log_artifacts(run.info.run_id, f"{tmp}/m", "model")
    assert (outside / run.info.run_id / "artifacts" / "model" / "MLmodel").exists()
    r = reg.dev.post("/v1/models/outside/versions", json={"run_id": run.info.run_id, "artifact_path": "model"})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "unsafe_source" and r.json()["details"]["field"] == "run_id"
