"""Ensemble training (app/ensembles/learners.py, app/ensembles/training.py) on scikit-learn's
bundled datasets: out-of-fold stacking without leakage, boosting with scikit-learn's own
AdaBoost and gradient boosting taken apart into members, bagging as parallel Ray tasks, and
a full ``kind: ensemble`` job through the in-process scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.ensembles import learners
from app.ensembles.definition import PinnedMember, combine_for
from app.ensembles.spec import EnsembleSpec
from app.ensembles.training import definition, fit_meta_learner, prepare, stacking_fit_predict, train_bagging, \
    train_boosting
from app.errors import InvalidInput, ModelError
from app.settings import load_settings
from app.training.validation import onnx_outputs


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return load_settings("local", matih_home=str(tmp_path_factory.mktemp("home")))


def _spec(**fields) -> EnsembleSpec:
    base = {"name": "ens", "task": "classification",
            "dataset": {"uri": "builtin://breast_cancer", "target": "target", "split": {"test_size": 0.3, "seed": 42}}}
    return EnsembleSpec.model_validate({**base, **fields})


def _stack_members():
    """Three weak, different members of breast cancer (all on the allow-list): a stump and a depth-2
    tree (one or three axis-aligned cuts, piecewise-constant probabilities) and a 5-nearest-neighbour
    vote on unscaled features (dominated by the area columns; probabilities in steps of 1/5)."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.tree import DecisionTreeClassifier

    return [DecisionTreeClassifier(max_depth=1, random_state=0), DecisionTreeClassifier(max_depth=2, random_state=0),
            KNeighborsClassifier(n_neighbors=5)]


# --- stacking: out-of-fold --------------------------------------------------------------------

def test_out_of_fold_no_row_comes_from_a_model_that_saw_it():
    """Each row's meta-feature comes from a model fit without it. The witness is a 1-nearest-
    neighbour member: fit on a row, it predicts that row's own label at distance 0, so with any
    leak its out-of-fold accuracy would be 1.0 (as its in-sample accuracy is)."""
    from sklearn.datasets import load_wine
    from sklearn.neighbors import KNeighborsClassifier

    X, y = load_wine(return_X_y=True)
    fits: list[tuple[np.ndarray, np.ndarray]] = []  # (rows fit on, rows predicted), per call

    def fit_predict(fit_rows, held_out):
        fits.append((fit_rows.copy(), held_out.copy()))
        nn = KNeighborsClassifier(n_neighbors=1).fit(X[fit_rows], y[fit_rows])
        return nn.predict(X[held_out]).reshape(-1, 1)

    oof, records = learners.out_of_fold(fit_predict, X, y, folds=5, seed=0)
    assert oof.shape == (len(X), 1) and len(records) == len(fits) == 5
    for row in range(len(X)):  # exactly one model produced this row's meta-feature, and it never saw the row
        producers = [fit for fit, held in fits if row in held]
        assert len(producers) == 1 and row not in producers[0]
    assert KNeighborsClassifier(n_neighbors=1).fit(X, y).score(X, y) == 1.0
    assert np.mean(oof[:, 0] == y) < 0.9  # unscaled wine: 1-NN is ~0.7 on unseen rows
    learners.check_no_leakage(records, len(X))  # what a job's result lets anyone re-check
    for (fit, held), rec in zip(fits, records):
        assert rec["held_out"] == held.tolist() and rec["fit_rows_sha256"] == learners.rows_sha256(fit)
    leaked = [dict(records[0], fit_rows_sha256=learners.rows_sha256(np.arange(len(X))))] + records[1:]
    with pytest.raises(ModelError, match="fold 0"):
        learners.check_no_leakage(leaked, len(X))


def test_out_of_fold_classification_folds_are_stratified():
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    _, records = learners.out_of_fold(lambda fit, held: np.zeros((len(held), 2)), X, y, folds=5, seed=3)
    for rec in records:
        assert np.bincount(y[rec["held_out"]]).tolist() == [10, 10, 10]


def test_stacking_beats_its_best_member_on_breast_cancer(settings):
    """Expected: the members are weak and err differently (one or three axis-aligned cuts vs a
    neighbour vote on unscaled features), and their probabilities are coarse (piecewise constant,
    steps of 1/5); a logistic meta-learner fit on their out-of-fold probabilities recalibrates
    and weighs them, which no single member can. Checked on the 30% holdout (split seed 42)
    with fold seed 0: ROC AUC 0.962 vs 0.949, log loss 0.218 vs 0.302, accuracy 0.930 vs 0.924."""
    from sklearn.base import clone
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    spec = _spec(method="stacking", members=[{"model": "stump/1"}, {"model": "tree2/1"}, {"model": "knn5/1"}])
    data = prepare(spec, settings)
    pinned = [PinnedMember(n, "1") for n in ("stump", "tree2", "knn5")]
    defn = definition(spec, data, pinned, combine_for(spec), has_combiner=True)

    from app.ensembles.combine import meta_features as layout

    fit_predict = stacking_fit_predict(spec, defn, _stack_members(), data.X_train, data.y_train, layout)
    oof, records = learners.out_of_fold(fit_predict, data.X_train, data.y_train, spec.combiner.folds, spec.seed)
    learners.check_no_leakage(records, len(data.X_train))
    combiner, diff = fit_meta_learner(spec, settings, oof, data.y_train)
    assert diff < 1e-4

    fitted = [clone(m).fit(data.X_train, data.y_train) for m in _stack_members()]  # what serving's members are
    served = layout(defn, [{"predictions": m.predict(data.X_holdout), "probabilities": m.predict_proba(data.X_holdout)}
                           for m in fitted])
    labels, proba = onnx_outputs(combiner, served)
    y = data.y_holdout
    members_auc = [roc_auc_score(y, m.predict_proba(data.X_holdout)[:, 1]) for m in fitted]
    members_ll = [log_loss(y, m.predict_proba(data.X_holdout)) for m in fitted]
    members_acc = [accuracy_score(y, m.predict(data.X_holdout)) for m in fitted]
    assert roc_auc_score(y, proba[:, 1]) > max(members_auc)
    assert log_loss(y, proba) < min(members_ll)
    assert accuracy_score(y, labels) > max(members_acc)


# --- boosting ---------------------------------------------------------------------------------

def test_adaboost_members_have_decreasing_weights_on_breast_cancer(settings):
    """AdaBoost.SAMME over stumps on breast cancer (binary), learning rate 1: a learner's weight is
    log((1 - e) / e), decreasing in its weighted error e. The first stump sees uniform weights and
    the best single cut errs on ~7% of the rows (weight 2.54); each reweighting gives the rows the
    previous stump got wrong half the total weight, so the next stump fits harder rows and errs
    more. Asserted: the first three weights strictly decrease, the first is the largest of all, and
    the last five average less than the first five (past round 5 the errors hover at 0.23-0.29 and
    the weights wobble, which is why no strict order is asserted there)."""
    spec = _spec(method="boosting", n_estimators=10,
                 base={"estimator": "sklearn.tree.DecisionTreeClassifier", "hyperparameters": {"max_depth": 1}})
    data = prepare(spec, settings)
    booster, models, weights, combine = train_boosting(spec, settings, data)
    assert combine.kind == "samme" and len(models) == len(weights) == 10
    assert weights[0] > weights[1] > weights[2]
    assert weights[0] == max(weights)
    assert np.mean(weights[5:]) < np.mean(weights[:5])
    assert weights == [float(w) for w in booster.estimator_weights_]

    # SAMME over the members' ONNX labels is the booster's own prediction
    classes = np.asarray(booster.classes_)
    votes = np.zeros((len(data.X_holdout), len(classes)))
    for m, w in zip(models, weights):
        labels, _ = onnx_outputs(m, data.X_holdout)
        votes[np.arange(len(labels)), np.searchsorted(classes, labels)] += w
    assert (classes[votes.argmax(axis=1)] == booster.predict(data.X_holdout)).all()


def test_gradient_boosting_members_reproduce_the_regressor(settings):
    from sklearn.ensemble import GradientBoostingRegressor

    spec = _spec(task="regression", method="boosting", n_estimators=12, learning_rate=0.3, seed=7,
                 dataset={"uri": "builtin://diabetes", "target": "target"},
                 base={"estimator": "sklearn.tree.DecisionTreeRegressor", "hyperparameters": {"max_depth": 2}})
    data = prepare(spec, settings)
    booster, models, weights, combine = train_boosting(spec, settings, data)
    assert combine.kind == "additive" and weights == [0.3] * 12 and len(models) == 12
    assert combine.bias == pytest.approx(float(np.mean(data.y_train)), rel=1e-6)  # init_ of squared error: the mean
    additive = combine.bias + sum(w * onnx_outputs(m, data.X_holdout)[0].reshape(-1) for m, w in zip(models, weights))
    reference = GradientBoostingRegressor(n_estimators=12, learning_rate=0.3, max_depth=2, random_state=7)
    reference.fit(data.X_train, data.y_train)
    expected = reference.predict(data.X_holdout)
    assert np.max(np.abs(additive - expected)) < 1e-4 * np.max(np.abs(expected))
    assert np.allclose(booster.predict(data.X_holdout), expected)


def test_gradient_boosting_refuses_a_base_that_is_not_a_regression_tree(settings):
    spec = _spec(task="regression", method="boosting", dataset={"uri": "builtin://diabetes", "target": "target"},
                 base={"estimator": "sklearn.ensemble.RandomForestRegressor"})
    data = prepare(spec, settings)
    with pytest.raises(InvalidInput, match="DecisionTreeRegressor"):
        train_boosting(spec, settings, data)
    spec = _spec(task="regression", method="boosting", dataset={"uri": "builtin://diabetes", "target": "target"},
                 base={"estimator": "sklearn.tree.DecisionTreeRegressor", "hyperparameters": {"splitter": "random"}})
    with pytest.raises(InvalidInput, match="splitter"):
        train_boosting(spec, settings, data)


# --- bagging ----------------------------------------------------------------------------------

def test_bootstrap_samples_are_seeded_and_stratified():
    y = np.array([0] * 90 + [1] * 10)
    a = learners.bootstrap_indices(100, 4, seed=5, y=y)
    b = learners.bootstrap_indices(100, 4, seed=5, y=y)
    assert all((p == q).all() for p, q in zip(a, b))
    assert len({tuple(p) for p in a}) == 4  # different replicas
    for rows in a:
        assert len(rows) == 100 and np.bincount(y[rows]).tolist() == [90, 10] and len(np.unique(rows)) < 100


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of two CPUs for this module (as tests/unit/test_tune.py starts one)."""
    import ray

    from tests.support import start_local_ray

    start_local_ray(2)
    yield
    ray.shutdown()


def test_bagging_trains_members_in_parallel_ray_tasks(settings, ray_local):
    """Four replicas, one Ray task each (1 CPU of 2): at least two ran at the same time in
    different worker processes (their [start, end] intervals overlap), and they are the same
    members the sequential path trains from the same seed (bytes of the ONNX models)."""
    spec = _spec(method="bagging", n_estimators=4, resources={"cpus_per_member": 1},
                 base={"estimator": "sklearn.ensemble.RandomForestClassifier",
                       "hyperparameters": {"n_estimators": 31, "random_state": 0}})
    data = prepare(spec, settings)
    replicas = train_bagging(spec, settings, data, parallel=True)
    assert [r.index for r in replicas] == [0, 1, 2, 3]
    overlapping = [(a.index, b.index) for a in replicas for b in replicas
                   if a.index < b.index and a.pid != b.pid and a.start < b.end and b.start < a.end]
    assert overlapping, [(r.index, r.pid, r.start, r.end) for r in replicas]
    sequential = train_bagging(spec, settings, data, parallel=False)
    assert [r.onnx for r in sequential] == [r.onnx for r in replicas]
    for r in replicas:
        labels, proba = onnx_outputs(r.onnx, data.X_holdout)
        assert proba.shape == (len(data.X_holdout), 2) and np.mean(labels == data.y_holdout) > 0.85


# --- a full job through the in-process scheduler ----------------------------------------------

def test_stacking_job_through_the_scheduler(tmp_path_factory):
    """Members trained by training jobs, then a ``kind: ensemble`` stacking job, all through the
    real scheduler policy on threads (as tests/unit/test_training_and_api.py). Needs the registry
    helper's ``pin_members``/``publish`` and the combine helper's ``meta_features`` (issue 13, merged
    by the lead)."""
    pytest.importorskip("app.ensembles.registry", reason="needs app/ensembles/registry.py (publish, pin_members)")
    pytest.importorskip("app.ensembles.combine", reason="needs app/ensembles/combine.py (meta_features)")
    from fastapi.testclient import TestClient

    from tests.support import in_process_context
    from tests.unit.test_training_and_api import InlineJobs, ThreadLauncher, wait

    from app.api.app import create_app
    from app.bootstrap import prepare as bootstrap
    from app.jobs.scheduler import SchedulerCore
    from app.store import MetadataStore

    settings = load_settings("local", matih_home=str(tmp_path_factory.mktemp("job-home")))
    prepared = bootstrap(settings)
    store = MetadataStore(settings.database_url)
    core = SchedulerCore(store, ThreadLauncher(settings, store), max_concurrent=1)
    client = TestClient(create_app(in_process_context(settings, prepared.admin_token, InlineJobs(core))))
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    dataset = {"uri": "builtin://breast_cancer", "target": "target", "split": {"test_size": 0.3, "seed": 42}}
    for name, est, hp in (("bc-stump", "sklearn.tree.DecisionTreeClassifier", {"max_depth": 1, "random_state": 0}),
                          ("bc-tree2", "sklearn.tree.DecisionTreeClassifier", {"max_depth": 2, "random_state": 0}),
                          ("bc-knn5", "sklearn.neighbors.KNeighborsClassifier", {"n_neighbors": 5})):
        r = client.post("/v1/training/jobs", json={"name": name, "estimator": est, "hyperparameters": hp,
                                                   "dataset": dataset, "register_as": name})
        assert r.status_code == 202, r.text
        assert wait(client, core, r.json()["job_id"])["status"] == "succeeded"

    spec = EnsembleSpec.model_validate({
        "name": "bc-stack", "task": "classification", "method": "stacking", "dataset": dataset,
        "members": [{"model": "bc-stump@champion"}, {"model": "bc-tree2@champion"}, {"model": "bc-knn5@champion"}],
    })
    job = store.create_job("ensemble", spec.name, spec.model_dump(mode="json"), "admin")
    done = wait(client, core, job["job_id"], timeout=300)
    assert done["status"] == "succeeded", (done.get("error"), done.get("logs"))
    res = done["result"]
    assert res["model_version"] == "1" and res["aliases"] == ["champion"] and res["method"] == "stacking"
    learners.check_no_leakage(res["folds"], sum(len(f["held_out"]) for f in res["folds"]))
    assert len(res["folds"]) == 5 and res["combiner_onnx_max_abs_diff"] < 1e-4

    blend = spec.model_copy(update={"name": "bc-blend", "method": "blending"})
    job = store.create_job("ensemble", blend.name, blend.model_dump(mode="json"), "admin")
    done = wait(client, core, job["job_id"], timeout=300)
    assert done["status"] == "succeeded", (done.get("error"), done.get("logs"))
    n_train = sum(len(f["held_out"]) for f in res["folds"])
    assert done["result"]["blend_rows"] == math.ceil(0.3 * n_train)  # train_test_split rounds the test share up


def test_stacking_refuses_a_member_no_job_trained(settings):
    """A member without a training job (uploaded) cannot be refit: 422 naming it, pointing at blending."""
    from app.ensembles.training import refit_estimators
    from app.store import MetadataStore

    spec = _spec(method="stacking", members=[{"model": "up/1"}, {"model": "other/2"}])
    store = MetadataStore(settings.database_url)
    store.migrate()
    members = [PinnedMember("up", "1", ref="up@champion"), PinnedMember("other", "2")]
    with pytest.raises(InvalidInput, match="up@champion.*use blending") as err:
        refit_estimators(spec, settings, members, [{}, {}], store)
    assert err.value.details["field"] == "members[0].model"
    with pytest.raises(InvalidInput, match="job-gone is not in the metadata store"):
        refit_estimators(spec, settings, members[1:], [{"matih.job_id": "job-gone"}], store)



def test_bagging_task_errors_come_back_as_matih_errors(settings, ray_local):
    spec = _spec(method="bagging", n_estimators=2,
                 base={"estimator": "sklearn.tree.DecisionTreeClassifier", "hyperparameters": {"max_depth": -3}})
    data = prepare(spec, settings)
    with pytest.raises(InvalidInput, match="bagging member"):
        train_bagging(spec, settings, data, parallel=True)


def test_what_an_ensemble_job_reserves(settings):
    from app.jobs.resources import job_needs

    bagging = _spec(method="bagging", n_estimators=8, resources={"cpus_per_member": 0.5},
                    base={"estimator": "sklearn.tree.DecisionTreeClassifier"}).model_dump(mode="json")
    wide = settings.model_copy(update={"jobs": settings.jobs.model_copy(update={"num_cpus": 16.0})})
    assert job_needs("ensemble", bagging, wide).as_dict() == {"CPU": 4.0, "GPU": 0.0}  # all 8 tasks at once
    assert job_needs("ensemble", bagging, settings).cpus == settings.jobs.num_cpus  # capped; more run as CPUs free
    stacking = _spec(method="stacking", members=[{"model": "a/1"}, {"model": "b/1"}]).model_dump(mode="json")
    needs = job_needs("ensemble", stacking, settings)
    assert needs.driver_cpus == needs.cpus == settings.jobs.num_cpus  # refits run in the driver


def test_torch_bagging_members_are_onnx_classifiers(settings):
    """A torch base: each replica trained by the in-process loop of strategy ``single`` on its
    bootstrap rows and exported to ONNX (label + probabilities); different samples and seeds
    give different members. Sequential here: parallelism is the sklearn test's subject."""
    spec = _spec(method="bagging", n_estimators=2, dataset={"uri": "builtin://iris", "target": "target"},
                 base={"framework": "torch", "model": {"kind": "mlp", "hidden": [16]},
                       "hyperparameters": {"epochs": 30, "lr": 0.05, "batch_size": 32}})
    data = prepare(spec, settings)
    replicas = train_bagging(spec, settings, data, parallel=False)
    assert len(replicas) == 2 and replicas[0].onnx != replicas[1].onnx
    for r in replicas:
        assert r.parity < 1e-4
        labels, proba = onnx_outputs(r.onnx, data.X_holdout)
        assert proba.shape == (len(data.X_holdout), 3) and np.mean(labels == data.y_holdout) > 0.8
