"""The combine rules of ensembles (app/ensembles/combine.py) and the in-process ensemble
(app/ensembles/local.py), checked against scikit-learn's own ensembles on tiny real models:
VotingClassifier (soft), AdaBoostClassifier (SAMME), GradientBoostingRegressor."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from sklearn.ensemble import AdaBoostClassifier, GradientBoostingRegressor, VotingClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsRegressor
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from app.ensembles.combine import COMBINERS, Combiner, combine, meta_features
from app.ensembles.definition import COMBINE_KINDS, Combine, EnsembleDefinition, PinnedMember
from app.ensembles.local import LocalEnsemble, meta_runner
from app.errors import DependencyUnavailable, ModelError
from app.onnx.sklearn_export import to_onnx
from app.training.validation import classification_metrics, regression_metrics


def _defn(kind, n, task="classification", classes=None, weights=None, **combine):
    weights = weights or [1.0] * n
    return EnsembleDefinition(
        name="ens", task=task, method="voting",
        members=tuple(PinnedMember(name=f"m{i}", version="1", weight=w) for i, w in enumerate(weights)),
        combine=Combine(kind, **combine), classes=classes, has_combiner=kind == "meta",
    )


def _split(loader, n=120):
    X, y = loader(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(X))
    X = (X - X.mean(axis=0)) / X.std(axis=0)  # standardised: logistic regressions converge at once
    X, y = X[idx].astype(np.float32), y[idx]
    return X[:n], y[:n], X[n:], y[n:]


def _answers(models, X):
    return [{"predictions": m.predict(X).tolist(), "probabilities": m.predict_proba(X).tolist()} for m in models]


@pytest.fixture(scope="module")
def iris():
    Xtr, ytr, Xte, yte = _split(load_iris, 90)
    models = [
        LogisticRegression(max_iter=500).fit(Xtr, ytr),
        DecisionTreeClassifier(max_depth=2, random_state=0).fit(Xtr, ytr),
        GaussianNB().fit(Xtr, ytr),
    ]
    return Xtr, ytr, Xte, yte, models


def test_every_kind_has_one_combiner():
    assert set(COMBINERS) == set(COMBINE_KINDS)
    assert all(isinstance(c, Combiner) and c.kind == k for k, c in COMBINERS.items())


def test_soft_vote_is_the_mean_of_probabilities_and_sklearns_voting_classifier(iris):
    Xtr, ytr, Xte, _, models = iris
    out = combine(_defn("soft_vote", 3, classes=[0, 1, 2]), _answers(models, Xte))
    mean = np.mean([m.predict_proba(Xte) for m in models], axis=0)
    np.testing.assert_allclose(out["probabilities"], mean, rtol=0, atol=1e-12)
    vc = VotingClassifier([(f"m{i}", FrozenEstimator(m)) for i, m in enumerate(models)], voting="soft").fit(Xtr, ytr)
    np.testing.assert_allclose(out["probabilities"], vc.predict_proba(Xte), rtol=0, atol=1e-12)
    assert out["predictions"] == vc.predict(Xte).tolist()
    assert all(type(p) is int for p in out["predictions"])  # JSON-ready, the classes' type


def test_weighted_soft_vote_with_string_labels_matches_voting_classifier(iris):
    Xtr, ytr, Xte, _, _ = iris
    names = np.array(["setosa", "versicolor", "virginica"])
    models = [LogisticRegression(max_iter=500).fit(Xtr, names[ytr]), GaussianNB().fit(Xtr, names[ytr])]
    out = combine(_defn("soft_vote", 2, classes=names.tolist(), weights=[3.0, 1.0]), _answers(models, Xte))
    vc = VotingClassifier([(f"m{i}", FrozenEstimator(m)) for i, m in enumerate(models)], voting="soft",
                          weights=[3, 1]).fit(Xtr, names[ytr])
    np.testing.assert_allclose(out["probabilities"], vc.predict_proba(Xte), rtol=0, atol=1e-12)
    assert out["predictions"] == vc.predict(Xte).tolist()


def _votes(*labels):
    return [{"predictions": [label]} for label in labels]


def test_hard_vote_weighted_majority_and_shares():
    defn = _defn("vote", 3, classes=["a", "b", "c"], weights=[3.0, 1.0, 1.0])
    out = combine(defn, _votes("a", "b", "b"))
    assert out["predictions"] == ["a"]
    np.testing.assert_allclose(out["probabilities"], [[0.6, 0.4, 0.0]])
    assert combine(_defn("vote", 3, classes=["a", "b", "c"]), _votes("a", "b", "b"))["predictions"] == ["b"]


def test_hard_vote_tie_goes_to_the_earliest_member_among_the_tied():
    defn = _defn("vote", 4, classes=[0, 1, 2])
    rows = [[1, 0, 0, 1], [0, 1, 1, 0], [2, 1, 0, 1], [2, 0, 1, 1]]  # 2-2, 2-2, then class 1 leads with 2
    outputs = [{"predictions": [r[m] for r in rows]} for m in range(4)]
    assert combine(defn, outputs)["predictions"] == [1, 0, 1, 1]
    # a 1-1-1 tie: the first member wins
    assert combine(_defn("vote", 3, classes=[0, 1, 2]), _votes(2, 0, 1))["predictions"] == [2]
    # exact sums: 0.25 + 0.25 == 0.5, a tie with member 0, which wins it
    weighted = _defn("vote", 3, classes=["x", "y"], weights=[0.5, 0.25, 0.25])
    assert combine(weighted, _votes("y", "x", "x"))["predictions"] == ["y"]
    assert combine(weighted, _votes("x", "y", "y"))["predictions"] == ["x"]


def test_hard_vote_without_ties_matches_voting_classifier(iris):
    Xtr, ytr, Xte, _, models = iris
    out = combine(_defn("vote", 3, classes=[0, 1, 2], weights=[2.0, 1.5, 1.0]), _answers(models, Xte))
    vc = VotingClassifier([(f"m{i}", FrozenEstimator(m)) for i, m in enumerate(models)], voting="hard",
                          weights=[2.0, 1.5, 1.0]).fit(Xtr, ytr)
    assert out["predictions"] == vc.predict(Xte).tolist()  # weights 2 > 1.5 > 1 leave no tie


@pytest.mark.parametrize("loader", [load_wine, load_breast_cancer])
def test_samme_equals_adaboost(loader):
    Xtr, ytr, Xte, _ = _split(loader, 120)
    ada = AdaBoostClassifier(DecisionTreeClassifier(max_depth=1), n_estimators=12, random_state=0).fit(Xtr, ytr)
    learners = ada.estimators_
    alphas = ada.estimator_weights_[: len(learners)].tolist()
    defn = _defn("samme", len(learners), classes=ada.classes_.tolist(), weights=alphas)
    out = combine(defn, [{"predictions": est.predict(Xte).tolist()} for est in learners])
    assert out["predictions"] == ada.predict(Xte).tolist()
    np.testing.assert_allclose(out["probabilities"], ada.predict_proba(Xte), rtol=1e-12, atol=1e-15)


def test_additive_equals_gradient_boosting():
    Xtr, ytr, Xte, _ = _split(load_diabetes, 300)
    gbr = GradientBoostingRegressor(n_estimators=15, max_depth=2, learning_rate=0.1, random_state=0).fit(Xtr, ytr)
    trees = gbr.estimators_[:, 0]
    defn = _defn("additive", len(trees), task="regression", weights=[gbr.learning_rate] * len(trees),
                 bias=float(gbr.init_.constant_.ravel()[0]))
    out = combine(defn, [{"predictions": t.predict(Xte).tolist()} for t in trees])
    np.testing.assert_allclose(out["predictions"], gbr.predict(Xte), rtol=1e-12)


@pytest.fixture(scope="module")
def diabetes():
    Xtr, ytr, Xte, yte = _split(load_diabetes, 300)
    models = [LinearRegression().fit(Xtr, ytr), DecisionTreeRegressor(max_depth=3, random_state=0).fit(Xtr, ytr),
              KNeighborsRegressor(5).fit(Xtr, ytr), Ridge(1.0).fit(Xtr, ytr)]
    return Xtr, ytr, Xte, yte, models


def test_mean_and_median_of_regressors(diabetes):
    _, _, Xte, _, models = diabetes
    preds = np.array([m.predict(Xte) for m in models])
    outputs = [{"predictions": p.tolist()} for p in preds]
    weights = [1.0, 2.0, 0.5, 1.5]
    mean = combine(_defn("mean", 4, task="regression", weights=weights), outputs)
    np.testing.assert_allclose(mean["predictions"], np.average(preds, axis=0, weights=weights), rtol=1e-12)
    median = combine(_defn("median", 4, task="regression", weights=weights), outputs)
    np.testing.assert_allclose(median["predictions"], np.median(preds, axis=0), rtol=1e-12)
    odd = combine(_defn("median", 3, task="regression"), outputs[:3])
    np.testing.assert_allclose(odd["predictions"], np.median(preds[:3], axis=0), rtol=1e-12)
    assert "probabilities" not in mean


def test_missing_members_renormalise_the_weights(iris, diabetes):
    _, _, Xte, _, models = iris
    answers = _answers(models, Xte)
    defn = _defn("soft_vote", 3, classes=[0, 1, 2], weights=[1.0, 2.0, 3.0])
    out = combine(defn, [answers[0], None, answers[2]])
    p0, p2 = (models[i].predict_proba(Xte).astype(np.float64) for i in (0, 2))
    expected = (1.0 * p0 + 3.0 * p2) / 4.0
    np.testing.assert_allclose(out["probabilities"], expected, rtol=0, atol=1e-12)

    vote = combine(_defn("vote", 3, classes=["a", "b"], weights=[1.0, 2.0, 3.0]), [*_votes("a", "b")[:1], None,
                                                                                        *_votes("b")])
    assert vote["predictions"] == ["b"]
    np.testing.assert_allclose(vote["probabilities"], [[0.25, 0.75]])

    _, _, Xr, _, regs = diabetes
    p = [m.predict(Xr) for m in regs]
    mean = combine(_defn("mean", 3, task="regression", weights=[1.0, 2.0, 4.0]),
                   [{"predictions": p[0].tolist()}, {"predictions": p[1].tolist()}, None])
    np.testing.assert_allclose(mean["predictions"], (p[0] + 2 * p[1]) / 3, rtol=1e-12)

    with pytest.raises(DependencyUnavailable):
        combine(defn, [None, None, None])


def test_meta_and_additive_refuse_a_missing_member(iris):
    _, _, Xte, _, models = iris
    answers = _answers(models, Xte)
    defn = _defn("meta", 3, classes=[0, 1, 2], meta_inputs="probabilities")
    with pytest.raises(DependencyUnavailable) as err:
        combine(defn, [answers[0], None, answers[2]], meta=lambda f: {"predictions": np.zeros(len(f), int)})
    assert "m1/1" in err.value.message and err.value.details["missing_members"] == ["m1/1"]
    with pytest.raises(DependencyUnavailable, match="m0/1"):
        meta_features(defn, [None, answers[1], answers[2]])
    with pytest.raises(DependencyUnavailable, match="m1/1"):
        combine(_defn("additive", 2, task="regression"), [{"predictions": [1.0]}, None])


def test_meta_features_layout(iris, diabetes):
    _, _, Xte, _, models = iris
    answers = _answers(models, Xte)
    probs = meta_features(_defn("meta", 3, classes=[0, 1, 2], meta_inputs="probabilities"), answers)
    assert probs.dtype == np.float32 and probs.shape == (len(Xte), 9)
    np.testing.assert_allclose(probs[:, 3:6], models[1].predict_proba(Xte), atol=1e-7)
    letters = ["p", "q", "r"]
    lettered = [{"predictions": [letters[v] for v in a["predictions"]]} for a in answers]
    idx = meta_features(_defn("meta", 3, classes=letters), lettered)
    assert idx.shape == (len(Xte), 3)
    np.testing.assert_array_equal(idx[:, 2], models[2].predict(Xte))
    _, _, Xr, _, regs = diabetes
    answers = [{"predictions": m.predict(Xr).tolist()} for m in regs[:2]]
    vals = meta_features(_defn("meta", 2, task="regression"), answers)
    np.testing.assert_allclose(vals[:, 1], regs[1].predict(Xr), rtol=1e-6)


def test_a_label_outside_the_classes_names_the_member():
    with pytest.raises(ModelError, match=r"m1/1.*'z'"):
        combine(_defn("vote", 2, classes=["a", "b"]), _votes("a", "z"))
    assert combine(_defn("vote", 2, classes=[0, 1]), _votes("1", "1"))["predictions"] == [1]  # JSON string keys


def test_kind_and_task_must_match():
    with pytest.raises(ModelError, match="regression"):
        combine(_defn("mean", 2, task="classification", classes=[0, 1]), _votes(0, 1))


def _onnx(est, X, classifier=True):
    return to_onnx(est, X, classifier).SerializeToString()


def test_local_ensemble_stacking_scores_the_ensemble_and_each_member():
    """Stacking on breast cancer through ONNX members and an ONNX meta-learner: the local
    ensemble's answer is the meta-learner's on meta_features, and score() reports the metrics
    of training jobs for the ensemble and every member."""
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    idx = np.random.default_rng(1).permutation(len(X))
    X, y = X[idx].astype(np.float32), y[idx]
    Xa, ya, Xb, yb, Xc, yc = X[:250], y[:250], X[250:450], y[250:450], X[450:], y[450:]
    members = [DecisionTreeClassifier(max_depth=3, random_state=0).fit(Xa, ya), GaussianNB().fit(Xa, ya),
               LogisticRegression(max_iter=1000).fit(Xa, ya)]
    blobs = [_onnx(m, Xa) for m in members]
    defn = _defn("meta", 3, classes=[0, 1], meta_inputs="probabilities")
    no_meta = LocalEnsemble(_defn("soft_vote", 3, classes=[0, 1]), blobs)
    feats = meta_features(defn, no_meta.member_outputs(Xb))
    meta = LogisticRegression(max_iter=1000).fit(feats, yb)
    local = LocalEnsemble(defn, blobs, _onnx(meta, feats))

    out = local.predict(Xc)
    expected = meta.predict_proba(meta_features(defn, local.member_outputs(Xc)))
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    assert out["predictions"] == meta.predict(meta_features(defn, local.member_outputs(Xc))).tolist()

    ens, each = local.score(Xc, yc)
    assert ens == classification_metrics(yc, np.asarray(out["predictions"]), np.asarray(out["probabilities"]), [0, 1])
    assert len(each) == 3 and set(each[0]) == {"accuracy", "f1", "log_loss", "roc_auc"}
    assert each[1]["accuracy"] == pytest.approx(float(np.mean(members[1].predict(Xc) == yc)))

    run = meta_runner(_onnx(meta, feats))
    assert set(run(feats[:5])) == {"predictions", "probabilities"}
    with pytest.raises(ModelError, match="meta-learner"):
        LocalEnsemble(defn, blobs)


def test_local_ensemble_soft_vote_and_regression(iris, diabetes):
    Xtr, ytr, Xte, yte, models = iris
    local = LocalEnsemble(_defn("soft_vote", 3, classes=[0, 1, 2]), [_onnx(m, Xtr) for m in models])
    out = local.predict(Xte)
    np.testing.assert_allclose(out["probabilities"], np.mean([m.predict_proba(Xte) for m in models], axis=0),
                               atol=1e-5)
    Xr, yr, Xrt, yrt, regs = diabetes
    reg = LocalEnsemble(_defn("median", 3, task="regression"), [_onnx(m, Xr, False) for m in regs[:3]])
    ens, each = reg.score(Xrt, yrt)
    median = np.median([m.predict(Xrt) for m in regs[:3]], axis=0)
    assert ens["rmse"] == pytest.approx(regression_metrics(yrt, median)["rmse"], rel=1e-5)
    assert [set(e) for e in each] == [{"rmse", "mae", "r2"}] * 3
