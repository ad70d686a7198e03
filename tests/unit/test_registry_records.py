"""Trust, approvals and the registry outbox in the metadata store (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect

from app.errors import Conflict, NotFound


def _audit(store, action):
    items, _ = store.list_audit(limit=500)
    return [a for a in items if a["action"] == action]


def test_migration_adds_the_tables(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"model_trust", "model_approvals", "registry_ops"} <= tables


def test_trust_and_approvals_are_recorded_with_their_digest_and_audited(store):
    assert store.get_trust("m", "1") is None
    rec = store.set_trust("m", "1", "a" * 64, "root")
    assert rec["sha256"] == "a" * 64 and rec["trusted_by"] == "root"
    store.set_trust("m", "1", "b" * 64, "root2")  # trusting again replaces the record
    assert store.get_trust("m", "1")["sha256"] == "b" * 64
    assert set(store.trust_of_model("m")) == {"1"}
    assert len(_audit(store, "model_version.trust")) == 2

    assert store.approvals("m", "1") == []
    store.add_approval("m", "1", "c" * 64, "root", "looks good")
    store.add_approval("m", "2", "d" * 64, "root")
    assert [a["comment"] for a in store.approvals("m", "1")] == ["looks good"]
    assert {a["version"] for a in store.approvals("m")} == {"1", "2"}
    assert len(_audit(store, "model_version.approve")) == 2


def test_an_op_completes_once_with_one_audit_record(store):
    op = store.begin_op("model_version.create", "m", "dev", {"source": "x"})
    assert [o["id"] for o in store.pending_ops()] == [op]
    assert store.pending_ops(older_than_s=3600) == []
    audit = ("model_version.create", "model_version", "m/1", None, {"version": "1"})
    assert store.finish_op(op, version="1", audit=audit) is True
    assert store.finish_op(op, version="1", audit=audit) is False  # a second finisher changes nothing
    assert store.get_op(op)["state"] == "done" and store.get_op(op)["version"] == "1"
    assert len(_audit(store, "model_version.create")) == 1
    assert store.pending_ops() == []

    op2 = store.begin_op("model_version.stage", "m", "dev", {"stage": "staging"}, version="1")
    assert store.finish_op(op2, "rolled_back", error="MLflow said no") is True
    assert store.finish_op(op2, "rolled_back") is False
    assert store.get_op(op2)["error"] == "MLflow said no"
    assert store.later_op_done(op, "m", "model_version.create") is False
    op3 = store.begin_op("model_version.create", "m", "dev", {})
    store.finish_op(op3)
    assert store.later_op_done(op, "m", "model_version.create") is True
    with pytest.raises(NotFound):
        store.finish_op(99999)


def test_model_delete_is_refused_while_an_endpoint_targets_it(store):
    store.create_endpoint("e1", "m@champion", "onnx", {}, "dev")
    store.create_endpoint("e2", "other/1", "onnx", {}, "dev")
    with pytest.raises(Conflict) as err:
        store.begin_model_delete("m", "dev", {})
    assert err.value.details["endpoints"] == ["e1"]
    assert store.pending_ops() == []  # the refused intent is not kept
    store.delete_endpoint("e1", "dev")
    op = store.begin_model_delete("m", "dev", {})
    store.set_trust("m", "1", "a" * 64, "root")
    store.add_approval("m", "1", "a" * 64, "root")
    # while the delete is in flight, no endpoint, version or stage change may target the model
    with pytest.raises(Conflict, match="being deleted"):
        store.create_endpoint("e3", "m/1", "onnx", {}, "dev", model="m")
    with pytest.raises(Conflict, match="being deleted"):
        store.update_endpoint("e2", {"target": "m/1"}, "dev", model="m")
    with pytest.raises(Conflict, match="being deleted"):
        store.begin_op("model_version.create", "m", "dev", {})
    assert [e["name"] for e in store.list_endpoints()[0]] == ["e2"]
    assert store.get_endpoint("e2")["target"] == "other/1"
    store.finish_op(op, audit=("model.delete", "model", "m", {}, None))
    assert store.get_trust("m", "1") is None and store.approvals("m") == []  # a new model "m" starts clean


def test_endpoint_creation_runs_its_check_inside_the_guard(store):
    def gone():
        raise NotFound("model 'm' is not in the registry")

    with pytest.raises(NotFound):
        store.create_endpoint("e", "m/1", "onnx", {}, "dev", model="m", verify=gone)
    with pytest.raises(NotFound):
        store.get_endpoint("e")
    store.create_endpoint("e", "m/1", "onnx", {}, "dev", model="m", verify=lambda: None)
    assert store.get_endpoint("e")["target"] == "m/1"


def test_delete_and_endpoint_creation_racing_never_leave_a_dangling_endpoint(store):
    """Each round, one thread deletes model m<i> (intent under the guard, then the "MLflow"
    delete, then completion) while another creates an endpoint on it (checking, inside the
    guard, that the model still exists). Whatever the interleaving: the endpoint exists only
    if the model does."""
    for i in range(15):
        model = f"m{i}"
        exists = {"yes": True}
        barrier = threading.Barrier(2)
        outcome = {}

        def delete():
            barrier.wait()
            try:
                op = store.begin_model_delete(model, "dev", {})
            except Conflict:
                outcome["delete"] = "refused"
                return
            exists["yes"] = False  # the MLflow delete
            store.finish_op(op, audit=("model.delete", "model", model, {}, None))
            outcome["delete"] = "done"

        def verify():
            if not exists["yes"]:
                raise NotFound(f"model {model!r} is not in the registry")

        def create():
            barrier.wait()
            try:
                store.create_endpoint(f"e{i}", f"{model}/1", "onnx", {}, "dev", model=model, verify=verify)
                outcome["create"] = "done"
            except (Conflict, NotFound):
                outcome["create"] = "refused"

        threads = [threading.Thread(target=delete), threading.Thread(target=create)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outcome.get("delete") in ("done", "refused") and outcome.get("create") in ("done", "refused")
        endpoint_exists = any(e["name"] == f"e{i}" for e in store.list_endpoints(limit=500)[0])
        assert not (endpoint_exists and not exists["yes"]), (i, outcome)
        assert (outcome["delete"] == "done") != endpoint_exists
