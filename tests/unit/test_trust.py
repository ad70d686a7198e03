"""Trust that cannot be forged: trust and approval are records in the metadata store with the
sha256 of the version's file; the MLflow tags only mirror them. Real MLflow (SQLite), real
metadata store, the API in process."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from tests.support import in_process_context
from tests.unit.test_registry_api import IRIS_ROW, _logreg, _Marker, _NoJobs, upload

from app.api.app import create_app
from app.bootstrap import prepare
from app.errors import Conflict
from app.registry.mlflow_registry import ModelRegistry
from app.serving.loader import ModelLoader
from app.settings import load_settings


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, _NoJobs())
    app = create_app(ctx)
    admin = TestClient(app)
    admin.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    _, token = ctx.store.create_token("dev", "developer", "admin")
    dev = TestClient(app)
    dev.headers["Authorization"] = f"Bearer {token}"

    class E:
        pass

    e = E()
    e.settings, e.store, e.admin, e.dev = settings, ctx.store, admin, dev
    e.mlflow = MlflowClient(settings.mlflow_tracking_uri)
    yield e
    ctx.store.dispose()


def _artifact_file(env, name: str, version: str) -> Path:
    uri = env.mlflow.get_model_version_download_uri(name, version)
    [path] = Path(urlparse(uri).path if uri.startswith("file:") else uri).rglob("model.pkl")
    return path


def _predict(client, endpoint: str, target: str, runtime: str = "native"):
    r = client.post("/v1/endpoints", json={"name": endpoint, "target": target, "runtime": runtime})
    assert r.status_code == 201, r.text
    return client.post(f"/v1/endpoints/{endpoint}/predict", json={"instances": [IRIS_ROW]})


def test_a_trusted_tag_set_in_mlflow_loads_nothing(env, tmp_path):
    marker = tmp_path / "pwned"
    r = upload(env.dev, "forged", "sklearn-pickle", pickle.dumps(_Marker(str(marker))))
    assert r.status_code == 201, r.text
    # Someone with write access to MLflow (not to the platform) forges trust and approval.
    for key, value in {"matih.trusted": "true", "matih.trusted_by": "admin", "matih.approved_by": "admin",
                       "matih.validation": "passed"}.items():
        env.mlflow.set_model_version_tag("forged", "1", key, value)

    v = env.dev.get("/v1/models/forged/versions/1").json()
    assert v["trusted"] is False and v["approved_by"] is None
    served = _predict(env.dev, "forged-native", "forged/1")
    assert served.status_code == 409 and served.json()["code"] == "untrusted_model", served.text
    conv = env.dev.post("/v1/models/forged/versions/1/convert")
    assert conv.status_code == 409 and conv.json()["code"] == "untrusted_model", conv.text
    prod = env.dev.post("/v1/models/forged/versions/1/stage", json={"stage": "production"})
    assert prod.status_code == 409, prod.text
    missing = " ".join(prod.json()["details"]["missing"])
    assert "approval" in missing and "trust" in missing
    # the loader itself, handed the forged version directly: no store record, no unpickling
    loader = ModelLoader(env.settings, ModelRegistry(env.settings), trust=env.store.get_trust)
    with pytest.raises(Conflict) as err:
        loader.load("native:forged/1")
    assert err.value.code == "untrusted_model"
    assert not marker.exists()


def test_trust_is_for_the_bytes_an_admin_saw(env, tmp_path):
    marker = tmp_path / "pwned"
    benign = pickle.dumps(_logreg())
    assert upload(env.dev, "swap", "sklearn-pickle", benign).status_code == 201  # v1
    assert upload(env.dev, "swap", "sklearn-pickle", benign).status_code == 201  # v2

    r = env.admin.post("/v1/models/swap/versions/1/trust")
    assert r.status_code == 200 and r.json()["trusted"] is True
    record = env.store.get_trust("swap", "1")
    import hashlib

    assert record["sha256"] == hashlib.sha256(benign).hexdigest() and record["trusted_by"] == "admin"
    assert env.mlflow.get_model_version("swap", "1").tags["matih.trusted"] == "true"  # the mirror
    card = env.dev.get("/v1/models/swap/versions/1/card").json()
    assert card["trusted_by"] == "admin" and card["trusted_sha256"] == record["sha256"]

    # After trust, the file in the artifact store is replaced: the digest no longer matches.
    env.admin.post("/v1/models/swap/versions/2/trust")
    _artifact_file(env, "swap", "2").write_bytes(pickle.dumps(_Marker(str(marker))))
    served = _predict(env.dev, "swap2", "swap/2")
    assert served.status_code == 409 and served.json()["code"] == "untrusted_model", served.text
    assert "not the one an admin trusted" in served.json()["error"]
    assert env.dev.post("/v1/models/swap/versions/2/convert").json()["code"] == "untrusted_model"
    assert not marker.exists()

    # Replaced before trust: the admin is told the file is not the one registered.
    assert upload(env.dev, "swap", "sklearn-pickle", benign).status_code == 201  # v3
    _artifact_file(env, "swap", "3").write_bytes(pickle.dumps(_Marker(str(marker))))
    r = env.admin.post("/v1/models/swap/versions/3/trust")
    assert r.status_code == 409 and r.json()["code"] == "artifact_changed", r.text
    assert env.store.get_trust("swap", "3") is None

    # The untouched trusted version serves.
    out = _predict(env.dev, "swap1", "swap/1")
    assert out.status_code == 200 and out.json()["predictions"] == [0], out.text
    assert not marker.exists()


def test_approvals_live_in_the_store(env):
    from tests.unit.test_registry_api import onnx_bytes

    assert upload(env.dev, "appr", "onnx", onnx_bytes()).status_code == 201
    env.mlflow.set_model_version_tag("appr", "1", "matih.approved_by", "admin")  # forged
    r = env.dev.post("/v1/models/appr/versions/1/stage", json={"stage": "production"})
    assert r.status_code == 409 and any("approval" in m for m in r.json()["details"]["missing"]), r.text
    assert env.dev.post("/v1/models/appr/versions/1/approve", json={"comment": "ok"}).status_code == 403
    r = env.admin.post("/v1/models/appr/versions/1/approve", json={"comment": "ok"})
    assert r.status_code == 200 and r.json()["approved_by"] == "admin", r.text
    [approval] = env.store.approvals("appr", "1")
    assert len(approval["sha256"]) == 64 and approval["comment"] == "ok"
    r = env.dev.post("/v1/models/appr/versions/1/stage", json={"stage": "production"})
    assert r.status_code == 200 and r.json()["stage"] == "production", r.text
    card = env.dev.get("/v1/models/appr/versions/1/card").json()
    assert [a["by"] for a in card["approvals"]] == ["admin"]
