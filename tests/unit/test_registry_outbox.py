"""Registry mutations through the outbox: what a crash leaves behind is finished or rolled
back by ``recover`` from what MLflow holds, with exactly one audit record per completed
mutation. Real MLflow (SQLite) and the real metadata store (SQLite, and PostgreSQL with the
``postgres`` param); the crash states are made the way a dying process leaves them."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from app.errors import Conflict, DependencyUnavailable
from app.registry.mlflow_registry import TAG_STAGE, ModelRegistry
from app.registry.outbox import OP_CREATE, OP_DELETE, OP_STAGE, TAG_OP, recover
from app.registry.service import RegistryService
from app.settings import load_settings
from tests.unit.test_registry_api import onnx_bytes


class _DiesAfterCreate(MlflowClient):
    """MLflow makes the version, then the connection drops before the answer arrives."""

    def create_model_version(self, *args, **kwargs):
        super().create_model_version(*args, **kwargs)
        raise MlflowException("connection reset", error_code=TEMPORARILY_UNAVAILABLE)


@pytest.fixture
def svc(store, tmp_path):
    settings = load_settings("local", matih_home=str(tmp_path / "home"), database_url=store.url,
                             mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings.matih_home.mkdir(parents=True, exist_ok=True)
    return RegistryService(settings, ModelRegistry(settings), store)


def _audits(store, action):
    return [a for a in store.list_audit(limit=1000)[0] if a["action"] == action]


def _register(svc, name="m"):
    return svc.register_upload(name, "onnx", onnx_bytes(), "dev")


def test_a_registration_completes_its_op_with_one_audit_record(svc):
    v = _register(svc)
    assert v["tags"][TAG_OP]
    assert svc.store.pending_ops() == []
    [audit] = _audits(svc.store, OP_CREATE)
    assert audit["resource_id"] == "m/1"
    assert recover(svc, older_than_s=0) == []


def test_a_version_made_before_the_crash_is_completed_by_recovery(svc):
    # the answer to create_model_version is lost: the op stays pending, the version exists
    svc.client = _DiesAfterCreate(svc.settings.mlflow_tracking_uri, svc.settings.mlflow_tracking_uri)
    with pytest.raises(DependencyUnavailable):
        _register(svc)
    [op] = svc.store.pending_ops()
    assert op["op"] == OP_CREATE and _audits(svc.store, OP_CREATE) == []
    svc.client = svc.registry.client
    assert recover(svc, older_than_s=3600) == []  # too young: maybe still in flight
    assert [r["outcome"] for r in recover(svc, older_than_s=0)] == ["done"]
    assert svc.store.get_op(op["id"])["version"] == "1"
    assert len(_audits(svc.store, OP_CREATE)) == 1
    assert recover(svc, older_than_s=0) == []  # settled once


def test_an_intent_without_a_version_is_rolled_back(svc):
    op = svc.store.begin_op(OP_CREATE, "m", "dev", {"nonce": "never-used"})  # died before create_model_version
    _register(svc)  # another version of the model, made by someone else meanwhile
    assert [r["outcome"] for r in recover(svc, older_than_s=0)] == ["rolled_back"]
    assert svc.store.get_op(op)["state"] == "rolled_back"
    assert len(_audits(svc.store, OP_CREATE)) == 1  # only the real one


def test_a_stage_change_cut_midway_is_finished(svc):
    _register(svc)
    # died after the alias, before the matih.stage tag and the completion
    op = svc.store.begin_op(OP_STAGE, "m", "dev", {"stage": "staging", "archive_existing": False,
                                                   "before": {"stage": "none", "aliases": []}}, version="1")
    svc.client.set_registered_model_alias("m", "staging", "1")
    assert [r["outcome"] for r in recover(svc, older_than_s=0)] == ["done"]
    mv = svc.client.get_model_version("m", "1")
    assert mv.tags[TAG_STAGE] == "staging" and str(svc.client.get_model_version_by_alias("m", "staging").version) == "1"
    assert svc.store.get_op(op)["state"] == "done"
    assert len(_audits(svc.store, "model_version.stage.staging")) == 1


def test_a_stage_change_overtaken_by_a_later_one_is_rolled_back(svc):
    _register(svc)
    _register(svc)
    stale = svc.store.begin_op(OP_STAGE, "m", "dev", {"stage": "staging", "before": {}}, version="1")
    svc.set_stage("m", "2", "staging", "dev")  # completed after the stale one began
    assert [r["outcome"] for r in recover(svc, older_than_s=0)] == ["rolled_back"]
    assert str(svc.client.get_model_version_by_alias("m", "staging").version) == "2"
    assert svc.store.get_op(stale)["state"] == "rolled_back"


def test_a_delete_cut_midway_is_finished_and_blocks_endpoints_until_then(svc):
    _register(svc)
    svc.store.set_trust("m", "1", "a" * 64, "root")
    op = svc.store.begin_model_delete("m", "dev", {"before": {"name": "m"}})  # died before MLflow's delete
    with pytest.raises(Conflict, match="being deleted"):
        svc.store.create_endpoint("e", "m/1", "onnx", {}, "dev", model="m")
    with pytest.raises(Conflict, match="being deleted"):
        _register(svc)
    assert [r["outcome"] for r in recover(svc, older_than_s=0)] == ["done"]
    assert svc.client.search_registered_models(filter_string="name = 'm'") == []
    assert svc.store.get_op(op)["state"] == "done" and svc.store.get_trust("m", "1") is None
    assert len(_audits(svc.store, OP_DELETE)) == 1
    v = _register(svc)  # a new model of the same name starts clean
    assert v["version"] == "1" and v["trusted"] is None


def test_a_retried_delete_supersedes_the_one_that_never_heard_back(svc):
    _register(svc)
    lost = svc.store.begin_model_delete("m", "dev", {})
    svc.delete_model("m", "dev")
    assert svc.store.get_op(lost)["state"] == "rolled_back"
    assert svc.store.pending_ops() == []
    svc.store.create_endpoint("e", "m/1", "onnx", {}, "dev", model="m")  # the name is free again


def test_model_delete_sees_an_endpoint_through_the_store(svc):
    _register(svc)
    svc.store.create_endpoint("e", "m/1", "onnx", {}, "dev", model="m", verify=lambda: svc.registry.resolve("m/1"))
    with pytest.raises(Conflict) as err:
        svc.delete_model("m", "dev")  # no used_by given: the guarded check in the store finds it
    assert err.value.details["endpoints"] == ["e"]
    assert svc.client.get_registered_model("m").name == "m"
    assert svc.store.pending_ops() == []
