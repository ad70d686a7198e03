"""The fused ONNX graph of an ensemble (app/ensembles/fused.py): one model whose answers equal
the fan-out's (LocalEnsemble over the same members) for every combine kind, with integer and
string class labels and for regressors; and scikit-learn's AdaBoost / gradient boosting where
the members are their learners."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris, load_wine
from sklearn.ensemble import AdaBoostClassifier, GradientBoostingRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsRegressor
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from app.ensembles.combine import meta_features
from app.ensembles.definition import Combine, EnsembleDefinition, PinnedMember
from app.ensembles.fused import FUSERS, check_parity, fuse, fusable
from app.ensembles.local import LocalEnsemble
from app.errors import ModelError
from app.onnx.sklearn_export import to_onnx


def _defn(kind, n, task="classification", classes=None, weights=None, n_features=None, **combine):
    weights = weights or [1.0] * n
    return EnsembleDefinition(
        name="ens", task=task, method="voting",
        members=tuple(PinnedMember(name=f"m{i}", version="1", weight=w) for i, w in enumerate(weights)),
        combine=Combine(kind, **combine), classes=classes, n_features=n_features, has_combiner=kind == "meta",
    )


def _split(loader, n):
    X, y = loader(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(X))
    X = (X - X.mean(axis=0)) / X.std(axis=0)  # standardised: logistic regressions converge at once
    X, y = X[idx].astype(np.float32), y[idx]
    return X[:n], y[:n], X[n:], y[n:]


def _fused_and_local(defn, estimators, X, combiner=None, classifier=True):
    protos = [to_onnx(e, X, classifier) for e in estimators]
    meta_proto = None if combiner is None else to_onnx(combiner[0], combiner[1], defn.task == "classification")
    fused = fuse(defn, protos, meta_proto).SerializeToString()
    local = LocalEnsemble(defn, [p.SerializeToString() for p in protos],
                          None if meta_proto is None else meta_proto.SerializeToString())
    return fused, local


def _run(fused, X):
    sess = ort.InferenceSession(fused, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": X})))


def _vote_members(Xtr, ytr, labels):
    """Four shallow trees, each seeing two features (the others zeroed): they disagree often,
    with 2-2 ties."""
    members = []
    for depth, cols in ((1, [0, 1]), (2, [2, 3]), (1, [1, 2]), (2, [0, 3])):
        mask = np.zeros(Xtr.shape[1], dtype=np.float32)
        mask[cols] = 1
        members.append(DecisionTreeClassifier(max_depth=depth, random_state=0).fit(Xtr * mask, labels[ytr]))
    return members


@pytest.mark.parametrize("labels", [np.array([0, 1, 2]), np.array([10, 20, 30]), np.array(["se", "ve", "vi"])])
def test_hard_vote_with_ties_fuses(labels):
    Xtr, ytr, Xte, _ = _split(load_iris, 60)
    members = _vote_members(Xtr, ytr, labels)
    defn = _defn("vote", 4, classes=labels.tolist())
    fused, local = _fused_and_local(defn, members, Xtr)
    outputs = local.member_outputs(Xte)
    votes = np.array([o["predictions"] for o in outputs]).T
    ties = [row for row in votes if sorted(np.unique(row, return_counts=True)[1].tolist()) in ([2, 2], [1, 1, 1, 1])]
    assert ties, "the holdout should hold 2-2 ties so that the tie rule is checked"
    assert check_parity(fused, local, Xte) < 1e-6
    out = _run(fused, Xte)
    assert set(out) == {"label", "probabilities"} and out["probabilities"].shape == (len(Xte), 3)
    # weighted: another answer, still equal to the fan-out
    weighted = _defn("vote", 4, classes=labels.tolist(), weights=[0.5, 0.25, 0.25, 1.0])
    fused_w, local_w = _fused_and_local(weighted, members, Xtr)
    check_parity(fused_w, local_w, Xte)


@pytest.mark.parametrize("string_labels", [False, True])
def test_soft_vote_fuses(string_labels):
    Xtr, ytr, Xte, _ = _split(load_wine, 100)
    names = np.array(["barolo", "grignolino", "barbera"]) if string_labels else np.array([0, 1, 2])
    members = [LogisticRegression(max_iter=1000).fit(Xtr, names[ytr]), GaussianNB().fit(Xtr, names[ytr]),
               DecisionTreeClassifier(max_depth=3, random_state=0).fit(Xtr, names[ytr])]
    classes = sorted(names.tolist())
    defn = _defn("soft_vote", 3, classes=classes, weights=[2.0, 1.0, 0.5], n_features=Xtr.shape[1])
    fused, local = _fused_and_local(defn, members, Xtr)
    assert check_parity(fused, local, Xte) < 1e-5
    out = _run(fused, Xte)
    expected = sum(w * m.predict_proba(Xte).astype(np.float64) for w, m in zip([2.0, 1.0, 0.5], members)) / 3.5
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    assert out["label"].tolist() == np.asarray(classes)[expected.argmax(axis=1)].tolist()


@pytest.mark.parametrize("loader", [load_breast_cancer, load_wine])
def test_samme_fuses_and_equals_adaboost(loader):
    Xtr, ytr, Xte, _ = _split(loader, 120)
    ada = AdaBoostClassifier(DecisionTreeClassifier(max_depth=1), n_estimators=8, random_state=0).fit(Xtr, ytr)
    learners = list(ada.estimators_)
    defn = _defn("samme", len(learners), classes=ada.classes_.tolist(),
                 weights=ada.estimator_weights_[: len(learners)].tolist())
    fused, local = _fused_and_local(defn, learners, Xtr)
    check_parity(fused, local, Xte)
    out = _run(fused, Xte)
    assert out["label"].tolist() == ada.predict(Xte).tolist()
    np.testing.assert_allclose(out["probabilities"], ada.predict_proba(Xte), atol=1e-6)


def test_string_labelled_samme_fuses():
    Xtr, ytr, Xte, _ = _split(load_iris, 90)
    names = np.array(["a", "b", "c"])
    ada = AdaBoostClassifier(DecisionTreeClassifier(max_depth=1), n_estimators=5, random_state=0).fit(Xtr, names[ytr])
    defn = _defn("samme", len(ada.estimators_), classes=["a", "b", "c"],
                 weights=ada.estimator_weights_[: len(ada.estimators_)].tolist())
    fused, local = _fused_and_local(defn, list(ada.estimators_), Xtr)
    check_parity(fused, local, Xte)
    assert _run(fused, Xte)["label"].tolist() == ada.predict(Xte).tolist()


@pytest.fixture(scope="module")
def diabetes():
    Xtr, ytr, Xte, yte = _split(load_diabetes, 300)
    return Xtr, ytr, Xte, yte, [
        LinearRegression().fit(Xtr, ytr), DecisionTreeRegressor(max_depth=3, random_state=0).fit(Xtr, ytr),
        KNeighborsRegressor(5).fit(Xtr, ytr), Ridge(0.5).fit(Xtr, ytr),
    ]


@pytest.mark.parametrize("kind,n", [("mean", 4), ("median", 4), ("median", 3)])
def test_averaging_of_regressors_fuses(diabetes, kind, n):
    Xtr, _, Xte, _, models = diabetes
    defn = _defn(kind, n, task="regression", weights=[1.0, 2.0, 0.5, 1.5][:n])
    fused, local = _fused_and_local(defn, models[:n], Xtr, classifier=False)
    out = _run(fused, Xte)
    assert list(out) == ["label"] and out["label"].shape == (len(Xte), 1)
    # float32 output of values in the hundreds: parity to float32 rounding
    assert check_parity(fused, local, Xte, tolerance=1e-3) < 1e-3
    preds = np.array([m.predict(Xte) for m in models[:n]], dtype=np.float64)
    expected = np.median(preds, axis=0) if kind == "median" else np.average(preds, axis=0, weights=defn.weights)
    np.testing.assert_allclose(out["label"][:, 0], expected, rtol=1e-4)


def test_additive_fuses_and_equals_gradient_boosting(diabetes):
    Xtr, ytr, Xte, _, _ = diabetes
    gbr = GradientBoostingRegressor(n_estimators=10, max_depth=2, learning_rate=0.2, random_state=0).fit(Xtr, ytr)
    trees = list(gbr.estimators_[:, 0])
    defn = _defn("additive", len(trees), task="regression", weights=[0.2] * len(trees),
                 bias=float(gbr.init_.constant_.ravel()[0]))
    fused, local = _fused_and_local(defn, trees, Xtr, classifier=False)
    check_parity(fused, local, Xte, tolerance=1e-3)
    np.testing.assert_allclose(_run(fused, Xte)["label"][:, 0], gbr.predict(Xte), rtol=1e-5)


@pytest.mark.parametrize("inputs", ["probabilities", "predictions"])
def test_stacking_classifier_fuses(inputs):
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    idx = np.random.default_rng(2).permutation(len(X))
    X, y = X[idx].astype(np.float32), np.array(["benign", "malignant"])[y[idx]]
    Xa, ya, Xb, yb, Xc = X[:250], y[:250], X[250:450], y[250:450], X[450:]
    members = [DecisionTreeClassifier(max_depth=3, random_state=0).fit(Xa, ya), GaussianNB().fit(Xa, ya)]
    defn = _defn("meta", 2, classes=["benign", "malignant"], meta_inputs=inputs)
    plain = LocalEnsemble(_defn("soft_vote", 2, classes=defn.classes), [to_onnx(m, Xa, True).SerializeToString()
                                                                         for m in members])
    feats = meta_features(defn, plain.member_outputs(Xb))
    meta = LogisticRegression(max_iter=1000).fit(feats, yb)
    fused, local = _fused_and_local(defn, members, Xa, combiner=(meta, feats))
    assert check_parity(fused, local, Xc) < 1e-5
    assert _run(fused, Xc)["label"].tolist() == meta.predict(meta_features(defn, local.member_outputs(Xc))).tolist()


def test_stacking_regressor_fuses(diabetes):
    Xtr, ytr, Xte, _, models = diabetes
    defn = _defn("meta", 3, task="regression")
    plain = LocalEnsemble(_defn("mean", 3, task="regression"), [to_onnx(m, Xtr, False).SerializeToString()
                                                                 for m in models[:3]])
    feats = meta_features(defn, plain.member_outputs(Xtr))
    meta = Ridge(1.0).fit(feats, ytr)
    fused, local = _fused_and_local(defn, models[:3], Xtr, combiner=(meta, feats), classifier=False)
    check_parity(fused, local, Xte, tolerance=1e-3)
    assert _run(fused, Xte)["label"].shape == (len(Xte), 1)


def test_parity_check_fails_when_the_graph_differs():
    Xtr, ytr, Xte, _ = _split(load_iris, 60)
    members = _vote_members(Xtr, ytr, np.array([0, 1, 2]))
    fused, _ = _fused_and_local(_defn("soft_vote", 4, classes=[0, 1, 2], weights=[5.0, 1.0, 1.0, 1.0]), members, Xtr)
    _, other = _fused_and_local(_defn("soft_vote", 4, classes=[0, 1, 2]), members, Xtr)
    with pytest.raises(ModelError, match="fan-out"):
        check_parity(fused, other, Xte)


def test_fusable():
    assert set(FUSERS) == {"vote", "soft_vote", "mean", "median", "meta", "samme", "additive"}
    assert fusable(_defn("soft_vote", 2, classes=[0, 1]))
    assert fusable(_defn("vote", 2, classes=["a", "b"]))
    assert not fusable(_defn("vote", 2, classes=[True, False]))
    native = EnsembleDefinition(
        name="ens", task="regression", method="averaging", combine=Combine("mean"),
        members=(PinnedMember("a", "1"), PinnedMember("b", "2", runtime="native")),
    )
    assert not fusable(native)
    with pytest.raises(ModelError, match="cannot be fused"):
        fuse(native, [onnx.ModelProto(), onnx.ModelProto()])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_onnx_serving_runtime_serves_a_fused_graph(tmp_path, diabetes, task):
    """The fused graph is an ordinary ONNX model to the platform: app/runtimes/onnx.py finds
    its label and probability outputs by name and answers what the fan-out answers."""
    from app.runtimes.onnx import OnnxModelRuntime

    if task == "classification":
        Xtr, ytr, Xte, _ = _split(load_iris, 60)
        members = _vote_members(Xtr, ytr, np.array(["se", "ve", "vi"]))
        defn = _defn("soft_vote", 4, classes=["se", "ve", "vi"])
        fused, local = _fused_and_local(defn, members, Xtr)
    else:
        Xtr, _, Xte, _, models = diabetes
        defn = _defn("median", 3, task="regression")
        fused, local = _fused_and_local(defn, models[:3], Xtr, classifier=False)
    (tmp_path / "model.onnx").write_bytes(fused)
    runtime = OnnxModelRuntime({})
    runtime.load(tmp_path, {"task": task, "classes": defn.classes})
    assert runtime.signature.n_features == Xte.shape[1]
    got = runtime.predict(Xte, probabilities=True)
    expected = local.predict(Xte)
    if task == "classification":
        assert got["predictions"] == expected["predictions"]
        np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-6)
    else:
        assert "probabilities" not in got
        np.testing.assert_allclose(got["predictions"], expected["predictions"], rtol=1e-6)
