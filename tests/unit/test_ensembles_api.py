"""``/v1/ensembles`` over the in-process context: real MLflow (SQLite), real members trained by
the training pipeline on iris, FastAPI's TestClient. An ensemble version is checked through
MLflow's own client and through the registry's routes (aliases, stages, card), since those
treat it like any model."""

from __future__ import annotations

import importlib.util
import json

import pytest
from fastapi.testclient import TestClient

from tests.support import NoJobs, in_process_context

from app.api.app import create_app
from app.bootstrap import prepare
from app.schemas import TrainingJobSpec
from app.settings import load_settings
from app.training.pipeline import train_sklearn

HAS_LOCAL = importlib.util.find_spec("app.ensembles.local") is not None


def _train(settings, name: str, estimator: str, job: str, **hp):
    spec = {"name": name, "estimator": estimator, "register_as": name, "hyperparameters": hp,
            "dataset": {"uri": "builtin://iris", "target": "target"}}
    return train_sklearn(TrainingJobSpec.model_validate(spec), settings, job, lambda *a: None)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    app = create_app(ctx)
    _train(settings, "ea-lr", "sklearn.linear_model.LogisticRegression", "j-lr", max_iter=300)
    _train(settings, "ea-tree", "sklearn.tree.DecisionTreeClassifier", "j-tree", max_depth=3, random_state=0)
    _train(settings, "ea-rf", "sklearn.ensemble.RandomForestClassifier", "j-rf", n_estimators=10, max_depth=3,
           random_state=0)

    def client(role: str) -> TestClient:
        c = TestClient(app)
        if role == "admin":
            c.headers["Authorization"] = f"Bearer {prepared.admin_token}"
        else:
            _, token = ctx.store.create_token(f"{role}-user", role, "admin")
            c.headers["Authorization"] = f"Bearer {token}"
        return c

    class A:
        pass

    a = A()
    a.settings, a.ctx, a.mlflow = settings, ctx, MlflowClient(settings.mlflow_tracking_uri)
    a.admin, a.dev, a.viewer = client("admin"), client("developer"), client("viewer")
    yield a
    ctx.store.dispose()


MEMBERS = [{"model": "ea-lr@champion"}, {"model": "ea-tree@champion"}, {"model": "ea-rf/1"}]


def _body(name: str, **extra):
    return {"name": name, "task": "classification", "method": "voting", "voting": "soft", "members": MEMBERS,
            "fuse": False, **extra}


def test_create_get_list_and_recreate(api):
    assert api.viewer.post("/v1/ensembles", json=_body("ea-ens")).status_code == 403
    r = api.dev.post("/v1/ensembles", json=_body("ea-ens"))
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["model_name"] == "ea-ens" and out["model_version"] == "1" and out["aliases"] == ["champion"]
    tags = api.mlflow.get_model_version("ea-ens", "1").tags
    assert tags["matih.kind"] == "ensemble" and tags["matih.format"] == "ensemble"
    pins = json.loads(tags["matih.ensemble"])["members"]
    assert [(p["name"], p["version"], p["ref"]) for p in pins] == [
        ("ea-lr", "1", "ea-lr@champion"), ("ea-tree", "1", "ea-tree@champion"), ("ea-rf", "1", "ea-rf/1")]

    again = api.dev.post("/v1/ensembles", json=_body("ea-ens"))
    assert again.status_code == 200 and again.json()["model_version"] == "1" and not again.json()["created"]

    listed = api.viewer.get("/v1/ensembles").json()
    assert [i["name"] for i in listed["items"]] == ["ea-ens"]  # plain models are not ensembles
    one = api.viewer.get("/v1/ensembles/ea-ens").json()
    assert one["current_version"] == "1" and one["definition"]["method"] == "voting"
    assert one["versions"][0]["members"][2] == {"ref": "ea-rf/1", "name": "ea-rf", "version": "1", "weight": 1.0,
                                                "runtime": "onnx", "metrics": None}
    assert api.viewer.get("/v1/ensembles/ea-lr").status_code == 404
    assert api.viewer.get("/v1/ensembles/nope").status_code == 404
    # the registry's own routes see an ensemble version like any other
    v = api.viewer.get("/v1/models/ea-ens/versions/1").json()
    assert v["format"] == "ensemble" and v["aliases"] == ["champion"]
    card = api.viewer.get("/v1/models/ea-ens/versions/1/card").json()
    assert card["ensemble"]["method"] == "voting" and card["ensemble"]["combine"] == "soft_vote"
    assert [m["ref"] for m in card["ensemble"]["members"]] == ["ea-lr@champion", "ea-tree@champion", "ea-rf/1"]
    assert card["ensemble"]["beats_best_member"] is None and card["ensemble"]["fused"] is False
    md = api.viewer.get("/v1/models/ea-ens/versions/1/card", params={"format": "markdown"}).text
    assert "## Ensemble" in md and "ea-rf/1 -> ea-rf/1" in md


def test_bad_specs_and_mismatched_members_are_422_naming_the_field(api):
    r = api.dev.post("/v1/ensembles", json={**_body("ea-bad"), "members": MEMBERS[:1]})
    assert r.status_code == 422 and "at least 2 members" in r.text
    r = api.dev.post("/v1/ensembles", json={**_body("ea-bad"), "members": [*MEMBERS, {"model": "ea-nope@champion"}]})
    assert r.status_code == 422
    assert r.json()["details"] == {"field": "members[3].model", "member": "ea-nope@champion"}
    r = api.dev.post("/v1/ensembles", json={**_body("ea-bad"), "task": "regression", "method": "averaging"})
    assert r.status_code == 422 and r.json()["details"]["field"] == "members[0].model"
    assert "classification" in r.json()["error"]
    assert api.dev.post("/v1/ensembles", json={**_body("ea-bad"), "weird": 1}).status_code == 422
    assert api.mlflow.search_registered_models("name = 'ea-bad'") == []


def test_trained_methods_are_queued_as_ensemble_jobs(api):
    body = {"name": "ea-stack", "task": "classification", "method": "stacking", "members": MEMBERS[:2],
            "dataset": {"uri": "builtin://iris", "target": "target"}}
    r = api.dev.post("/v1/ensembles", json=body)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "queued" and [m["version"] for m in out["members"]] == ["1", "1"]
    job = api.viewer.get(f"/v1/jobs/{out['job_id']}").json()
    assert job["kind"] == "ensemble" and job["spec"]["method"] == "stacking"
    bad = api.dev.post("/v1/ensembles", json={**body, "members": [MEMBERS[0], {"model": "ea-nope/1"}]})
    assert bad.status_code == 422 and bad.json()["details"]["member"] == "ea-nope/1"
    bag = {"name": "ea-bag", "task": "classification", "method": "bagging",
           "base": {"estimator": "sklearn.tree.DecisionTreeClassifier"},
           "dataset": {"uri": "builtin://nope", "target": "target"}}
    r = api.dev.post("/v1/ensembles", json=bag)
    assert r.status_code == 422 and r.json()["details"]["field"] == "dataset.uri"


def test_an_ensemble_version_is_promoted_through_aliases_and_served_by_target(api):
    body = _body("ea-promo")
    assert api.dev.post("/v1/ensembles", json=body).json()["aliases"] == ["champion"]
    _train(api.settings, "ea-tree", "sklearn.tree.DecisionTreeClassifier", "j-tree2", max_depth=2, random_state=0)
    r = api.dev.put("/v1/models/ea-tree/aliases/champion", json={"version": "2"})
    assert r.status_code == 200
    second = api.dev.post("/v1/ensembles", json=body).json()
    assert second["model_version"] == "2" and second["aliases"] == ["challenger"] and second["created"]
    one = api.viewer.get("/v1/ensembles/ea-promo").json()
    assert one["current_version"] == "1"  # the champion's definition until it is promoted

    assert api.dev.put("/v1/models/ea-promo/aliases/champion", json={"version": "2"}).status_code == 200
    one = api.viewer.get("/v1/ensembles/ea-promo").json()
    assert one["current_version"] == "2" and one["aliases"]["champion"] == "2"
    assert one["definition"]["members"][1]["version"] == "2"
    r = api.dev.post("/v1/models/ea-promo/versions/2/stage", json={"stage": "staging"})
    assert r.status_code == 200 and r.json()["stage"] == "staging"

    # an endpoint takes the ensemble's alias as its target, unchanged
    r = api.dev.post("/v1/endpoints", json={"name": "ea-promo-ep", "target": "ea-promo@champion"})
    assert r.status_code == 201, r.text
    assert r.json()["model_version"] == "2"


@pytest.mark.skipif(not HAS_LOCAL, reason="app.ensembles.local (LocalEnsemble) has not landed on this branch")
def test_scored_ensemble_card_shows_member_metrics_and_beats_best_member(api):
    body = _body("ea-scored", dataset={"uri": "builtin://iris", "target": "target"},
                 validation={"gates": [{"metric": "accuracy", "min": 0.5}]})
    r = api.dev.post("/v1/ensembles", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["metrics"]["accuracy"] > 0.8 and len(out["member_metrics"]) == 3
    best = max(m["accuracy"] for m in out["member_metrics"])
    assert out["beats_best_member"] == (out["metrics"]["accuracy"] > best)
    assert out["validation"]["passed"]
    card = api.viewer.get("/v1/models/ea-scored/versions/1/card").json()
    ens = card["ensemble"]
    assert [m["metrics"]["accuracy"] for m in ens["members"]] == pytest.approx(
        [m["accuracy"] for m in out["member_metrics"]], abs=1e-5)
    assert ens["beats_best_member"] == out["beats_best_member"] and ens["main_metric"] == "accuracy"
    assert card["metrics"]["accuracy"] == pytest.approx(out["metrics"]["accuracy"])
    # a second version is gated against the champion, itself an ensemble scored on the same holdout
    weighted = {**body, "members": [{**MEMBERS[0], "weight": 3}, *MEMBERS[1:]],
                "validation": {"gates": [{"metric": "accuracy", "beat_champion_by": 0.0}]}}
    r = api.dev.post("/v1/ensembles", json=weighted)
    champ = (r.json().get("validation") or r.json().get("details", {}).get("result", {}).get("validation") or {})
    assert champ["champion"]["version"] == "1"
    assert champ["champion"]["metrics"]["accuracy"] == pytest.approx(out["metrics"]["accuracy"])
    failing = _body("ea-scored2", dataset={"uri": "builtin://iris", "target": "target"},
                    validation={"gates": [{"metric": "accuracy", "min": 1.01}]})
    r = api.dev.post("/v1/ensembles", json=failing)
    assert r.status_code == 422 and r.json()["code"] == "validation_failed"
    assert api.mlflow.search_model_versions("name = 'ea-scored2'") == []


HAS_FUSED = HAS_LOCAL and importlib.util.find_spec("app.ensembles.fused") is not None


@pytest.mark.skipif(not HAS_FUSED, reason="app.ensembles.fused has not landed on this branch")
def test_a_fused_ensemble_is_also_a_plain_onnx_model_an_endpoint_serves(api):
    r = api.dev.post("/v1/ensembles", json=_body("ea-fused", fuse=True))
    assert r.status_code == 201, r.text
    assert r.json()["fused"] is True
    mv = api.mlflow.get_model_version("ea-fused", "1")
    assert mv.tags["matih.format"] == "onnx" and json.loads(mv.tags["matih.formats"]) == ["onnx", "ensemble"]
    assert float(mv.tags["matih.onnx_max_abs_diff"]) <= api.settings.jobs.onnx_parity_tolerance
    files = {a.path for a in api.mlflow.list_artifacts(mv.run_id, "model")}
    assert {"model/model.onnx", "model/ensemble.json", "model/MLmodel"} <= files
    assert api.viewer.get("/v1/models/ea-fused/versions/1/card").json()["ensemble"]["fused"] is True

    r = api.dev.post("/v1/endpoints", json={"name": "ea-fused-ep", "target": "ea-fused@champion"})
    assert r.status_code == 201, r.text
    row = [5.1, 3.5, 1.4, 0.2]
    pred = api.dev.post("/v1/endpoints/ea-fused-ep/predict", json={"instances": [row], "return_probabilities": True})
    assert pred.status_code == 200, pred.text
    assert pred.json()["predictions"] == [0] and len(pred.json()["probabilities"][0]) == 3


@pytest.mark.skipif(not HAS_FUSED, reason="app.ensembles.local and fused have not landed on this branch")
def test_averaging_regressors_scored_by_rmse_and_fused(api):
    for name, est in (("ea-lin", "sklearn.linear_model.LinearRegression"), ("ea-ridge", "sklearn.linear_model.Ridge")):
        spec = {"name": name, "estimator": est, "register_as": name,
                "dataset": {"uri": "builtin://diabetes", "target": "target"}}
        train_sklearn(TrainingJobSpec.model_validate(spec), api.settings, f"j-{name}", lambda *a: None)
    body = {"name": "ea-avg", "task": "regression", "method": "averaging", "averaging": "weighted",
            "members": [{"model": "ea-lin@champion", "weight": 2}, {"model": "ea-ridge@champion"}],
            "dataset": {"uri": "builtin://diabetes", "target": "target"}}
    r = api.dev.post("/v1/ensembles", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert set(out["metrics"]) >= {"rmse", "r2"} and [m["rmse"] > 0 for m in out["member_metrics"]] == [True, True]
    assert out["beats_best_member"] == (out["metrics"]["rmse"] < min(m["rmse"] for m in out["member_metrics"]))
    assert out["fused"] is True and out["definition"]["combine"]["kind"] == "mean"
    assert [m["weight"] for m in out["definition"]["members"]] == [2.0, 1.0]
    card = api.viewer.get("/v1/models/ea-avg/versions/1/card").json()["ensemble"]
    assert card["main_metric"] == "rmse" and card["fused"] is True
