"""Ensembles on the registry side, without Ray or HTTP: members pinned through MLflow (SQLite)
and checked against each other, one version per definition, the outbox and the job path's
repeatability, and members registered for bagging and boosting. Members are tiny real iris
and diabetes models trained by the training pipeline."""

from __future__ import annotations

import json

import pytest

from app.bootstrap import prepare
from app.ensembles.definition import DEFINITION_TAG, KIND_TAG, EnsembleDefinition, PinnedMember
from app.ensembles.registry import definition_tag, pin_definition, pin_members, publish, register_members
from app.ensembles.spec import EnsembleSpec
from app.errors import Conflict, InvalidInput
from app.registry.mlflow_registry import ModelRegistry
from app.registry.service import RegistryService
from app.registry import formats as F
from app.schemas import TrainingJobSpec
from app.settings import load_settings
from app.store import MetadataStore
from app.training.pipeline import train_sklearn


def _train(settings, name: str, estimator: str, job: str, dataset: str = "builtin://iris", features=None, **hp):
    spec = {"name": name, "estimator": estimator, "register_as": name, "hyperparameters": hp,
            "dataset": {"uri": dataset, "target": "target", **({"features": features} if features else {})}}
    return train_sklearn(TrainingJobSpec.model_validate(spec), settings, job, lambda *a: None)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepare(settings)
    store = MetadataStore(settings.database_url)
    registry = ModelRegistry(settings)
    _train(settings, "er-lr", "sklearn.linear_model.LogisticRegression", "j-lr", max_iter=300)
    _train(settings, "er-tree", "sklearn.tree.DecisionTreeClassifier", "j-tree", max_depth=3, random_state=0)
    _train(settings, "er-rf", "sklearn.ensemble.RandomForestClassifier", "j-rf", n_estimators=10, max_depth=3, random_state=0)
    client = MlflowClient(settings.mlflow_tracking_uri)
    features = json.loads(client.get_model_version("er-lr", "1").tags["matih.feature_names"])
    _train(settings, "er-lr3", "sklearn.linear_model.LogisticRegression", "j-lr3", features=features[:3], max_iter=300)
    _train(settings, "er-diab", "sklearn.linear_model.LinearRegression", "j-diab", dataset="builtin://diabetes")

    class E:
        pass

    e = E()
    e.settings, e.store, e.registry, e.client, e.features = settings, store, registry, client, features
    yield e
    store.dispose()


def _spec(name: str, members: list, **extra) -> EnsembleSpec:
    return EnsembleSpec.model_validate({"name": name, "task": "classification", "method": "voting",
                                        "members": [m if isinstance(m, dict) else {"model": m} for m in members],
                                        "fuse": False, **extra})


def test_members_are_pinned_by_alias_version_and_uri(env):
    spec = _spec("er-pin", ["er-lr@champion", {"model": "er-tree/1", "weight": 2}, "models:/er-rf@champion"])
    defn = pin_definition(env.registry, env.settings, spec)
    assert [(m.name, m.version, m.weight, m.ref) for m in defn.members] == [
        ("er-lr", "1", 1.0, "er-lr@champion"), ("er-tree", "1", 2.0, "er-tree/1"),
        ("er-rf", "1", 1.0, "models:/er-rf@champion")]
    assert defn.classes == [0, 1, 2] and defn.feature_names == env.features and defn.n_features == 4
    assert defn.combine.kind == "soft_vote" and defn.task == "classification"
    avg = EnsembleSpec.model_validate({"name": "er-avg", "task": "regression", "method": "averaging",
                                       "averaging": "median", "members": [
                                           {"model": "er-diab@champion", "weight": 3}, {"model": "er-diab/1"}]})
    d2 = pin_definition(env.registry, env.settings, avg)
    assert d2.weights == [1.0, 1.0] and d2.combine.kind == "median"  # median ignores weights


def _refused(env, members, task="classification"):
    spec = _spec("er-bad", members, task=task)
    with pytest.raises(InvalidInput) as exc:
        pin_definition(env.registry, env.settings, spec)
    return exc.value


def test_mismatched_members_are_a_422_naming_the_member(env):
    err = _refused(env, ["er-lr@champion", "er-diab@champion"])
    assert err.details == {"field": "members[1].model", "member": "er-diab@champion"}
    assert "er-diab@champion" in err.message and "regression" in err.message

    err = _refused(env, ["er-lr@champion", "er-tree/1", "er-lr3/1"])
    assert err.details == {"field": "members[2].model", "member": "er-lr3/1"} and "features" in err.message

    # same task and features, other classes: an ONNX upload that says so
    from app.onnx.sklearn_export import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    names = ["setosa", "versicolor", "virginica"]
    model = to_onnx(LogisticRegression(max_iter=300).fit(X, [names[i] for i in y]), X, True)
    svc = RegistryService(env.settings, env.registry, env.store)
    svc.register_upload("er-named", "onnx", model.SerializeToString(), "t",
                        hints=F.Hints(task="classification", feature_names=env.features, classes=names))
    err = _refused(env, ["er-lr@champion", "er-named/1"])
    assert err.details["member"] == "er-named/1" and "classes" in err.message

    # no feature names on one member: the widths of the signatures decide
    narrow = to_onnx(LogisticRegression(max_iter=300).fit(X[:, :3], y), X[:, :3], True)
    svc.register_upload("er-narrow", "onnx", narrow.SerializeToString(), "t",
                        hints=F.Hints(task="classification", classes=[0, 1, 2]))
    err = _refused(env, ["er-lr@champion", "er-narrow/1"])
    assert err.details["member"] == "er-narrow/1" and "3 inputs" in err.message and "4" in err.message
    wide = to_onnx(LogisticRegression(max_iter=300).fit(X, y), X, True)
    svc.register_upload("er-wide", "onnx", wide.SerializeToString(), "t",
                        hints=F.Hints(task="classification", classes=[0, 1, 2]))
    assert pin_definition(env.registry, env.settings, _spec("er-w", ["er-lr@champion", "er-wide/1"])).n_features == 4

    err = _refused(env, ["er-lr@champion", "er-nope@champion"])
    assert err.details == {"field": "members[1].model", "member": "er-nope@champion"}
    err = _refused(env, ["er-lr@champion", "not a ref"])
    assert err.details["field"] == "members[1].model"
    err = _refused(env, ["er-lr@champion", {"model": "er-tree/1", "runtime": "nope"}])
    assert err.details["field"] == "members[1].config"


def test_an_archived_member_or_an_ensemble_member_is_refused(env):
    _train(env.settings, "er-old", "sklearn.linear_model.LogisticRegression", "j-old", max_iter=300)
    env.client.set_model_version_tag("er-old", "1", "matih.stage", "archived")
    err = _refused(env, ["er-lr@champion", "er-old/1"])
    assert err.details["member"] == "er-old/1" and "archived" in err.message

    defn = pin_definition(env.registry, env.settings, _spec("er-inner", ["er-lr@champion", "er-tree/1"]))
    publish(env.registry, env.settings, defn, fuse=False, actor="t", store=env.store)
    err = _refused(env, ["er-lr@champion", "er-inner@champion"])
    assert err.details["member"] == "er-inner@champion" and "ensemble" in err.message


def test_publish_makes_one_tagged_version_and_reuses_it_for_the_same_pins(env):
    defn = pin_definition(env.registry, env.settings,
                          _spec("er-ens", ["er-lr@champion", "er-tree@champion", "er-rf@champion"]))
    out = publish(env.registry, env.settings, defn, fuse=False, actor="t", store=env.store)
    assert out["model_version"] == "1" and out["aliases"] == ["champion"] and out["created"]
    assert out["fused"] is False and out["metrics"] is None  # no dataset: not scored
    mv = env.client.get_model_version("er-ens", "1")
    tags = mv.tags
    assert tags[KIND_TAG] == "ensemble" and tags["matih.format"] == "ensemble"
    assert json.loads(tags["matih.formats"]) == ["ensemble"] and tags["matih.task"] == "classification"
    assert json.loads(tags["matih.classes"]) == [0, 1, 2] and json.loads(tags["matih.feature_names"]) == env.features
    assert EnsembleDefinition.from_json(tags[DEFINITION_TAG]) == defn
    assert tags["matih.validation"] == "passed"  # every member passed its own
    assert env.client.get_registered_model("er-ens").tags[KIND_TAG] == "ensemble"
    files = {a.path for a in env.client.list_artifacts(mv.run_id, "model")}
    assert {"model/ensemble.json", "model/MLmodel"} <= files and "model/model.onnx" not in files
    assert not env.store.pending_ops()  # the outbox entry was completed

    again = publish(env.registry, env.settings, defn, fuse=False, actor="t", store=env.store)
    assert again["model_version"] == "1" and not again["created"] and again["aliases"] == ["champion"]
    assert len(env.client.search_model_versions("name = 'er-ens'")) == 1

    # a member's alias moves: a new version, with the alias of a later version
    _train(env.settings, "er-tree", "sklearn.tree.DecisionTreeClassifier", "j-tree2", max_depth=2, random_state=0)
    env.client.set_registered_model_alias("er-tree", "champion", "2")
    moved = pin_definition(env.registry, env.settings,
                           _spec("er-ens", ["er-lr@champion", "er-tree@champion", "er-rf@champion"]))
    out2 = publish(env.registry, env.settings, moved, fuse=False, actor="t", store=env.store)
    assert out2["model_version"] == "2" and out2["aliases"] == ["challenger"]
    assert out2["definition"]["members"][1]["version"] == "2"


def test_a_job_publish_is_repeatable_and_a_plain_model_name_is_not_taken(env):
    spec = _spec("er-job", ["er-lr@champion", "er-rf@champion"])
    defn = pin_definition(env.client, env.settings, spec)  # a job holds an MlflowClient
    assert pin_members(env.client, env.settings, spec) == list(defn.members)
    with pytest.raises(InvalidInput) as exc:
        pin_members(env.client, env.settings, _spec("er-job", ["er-lr@champion", "er-rf@nope"]))
    assert exc.value.details["member"] == "er-rf@nope"
    first = publish(env.client, env.settings, defn, fuse=False, job_id="job-e1", actor="t")
    retry = publish(env.client, env.settings, defn, fuse=False, job_id="job-e1", actor="t")
    assert first["model_version"] == retry["model_version"] == "1" and retry["aliases"] == ["champion"]
    assert env.client.get_model_version("er-job", "1").tags["matih.job_id"] == "job-e1"

    plain = pin_definition(env.registry, env.settings, _spec("er-lr", ["er-tree/1", "er-rf@champion"]))
    with pytest.raises(Conflict):
        publish(env.client, env.settings, plain, fuse=False, actor="t")


def test_gates_need_data_and_oversized_definitions_are_refused(env):
    defn = pin_definition(env.registry, env.settings, _spec("er-gates", ["er-lr@champion", "er-rf@champion"]))
    from app.training.spec import ValidationSpec

    gates = ValidationSpec.model_validate({"gates": [{"metric": "accuracy", "min": 0.5}]})
    with pytest.raises(InvalidInput) as exc:
        publish(env.client, env.settings, defn, validation=gates, fuse=False, actor="t")
    assert exc.value.details["field"] == "dataset"
    big = EnsembleDefinition(name="x", task="classification", method="voting", combine=defn.combine,
                             members=tuple(PinnedMember("m", "1", config={"url": "u" * 200}) for _ in range(30)))
    with pytest.raises(InvalidInput):
        definition_tag(big)


def test_register_members_for_bagging_is_repeatable_by_job_and_index(env):
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    from app.onnx.sklearn_export import to_onnx

    X, y = load_iris(return_X_y=True)
    models = [to_onnx(DecisionTreeClassifier(max_depth=d, random_state=0).fit(X, y), X, True).SerializeToString()
              for d in (1, 2, 3)]
    kw = {"task": "classification", "classes": [0, 1, 2], "feature_names": env.features, "job_id": "job-bag"}
    pins = register_members(env.client, env.settings, "er-bag", models, weights=[0.5, 1, 2], **kw)
    assert [(p.name, p.version, p.weight) for p in pins] == [
        ("er-bag-members", "1", 0.5), ("er-bag-members", "2", 1.0), ("er-bag-members", "3", 2.0)]
    tags = env.client.get_model_version("er-bag-members", "3").tags
    assert tags["matih.member_index"] == "2" and tags["matih.job_id"] == "job-bag" and tags["matih.format"] == "onnx"
    assert not env.client.get_registered_model("er-bag-members").aliases
    again = register_members(env.client, env.settings, "er-bag", models, **kw)
    assert [p.version for p in again] == ["1", "2", "3"]
    other = register_members(env.client, env.settings, "er-bag", models[:1], **{**kw, "job_id": "job-bag2"})
    assert [p.version for p in other] == ["4"]
