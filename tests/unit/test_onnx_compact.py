"""Tree-ensemble classifiers are compacted after conversion and predict exactly as before."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from skl2onnx import to_onnx as skl2onnx_to_onnx
from sklearn.datasets import load_breast_cancer, load_digits, load_iris
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from app.onnx.compact import compact_tree_ensembles
from app.onnx.sklearn_export import onnx_parity, to_onnx


def _raw(est, X):
    return skl2onnx_to_onnx(est, X[:1], options={id(est): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})


def _run(model, X):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: X})


def _leaf_attr(model, name):
    node = next(n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier")
    attr = next((a for a in node.attribute if a.name == name), None)
    return None if attr is None else (list(attr.ints) or list(attr.floats))


def _data(name):
    X, y = {"digits": load_digits, "iris": load_iris, "cancer": load_breast_cancer}[name](return_X_y=True)
    return X.astype(np.float32), y


@pytest.mark.parametrize(
    "data,est",
    [
        ("digits", RandomForestClassifier(n_estimators=20, random_state=0)),  # 10 classes, pure leaves
        ("digits", ExtraTreesClassifier(n_estimators=10, random_state=0)),
        ("cancer", RandomForestClassifier(n_estimators=20, random_state=0)),  # two classes
        ("cancer", DecisionTreeClassifier(random_state=0)),
        ("iris", GradientBoostingClassifier(n_estimators=20, random_state=0)),
        ("cancer", GradientBoostingClassifier(n_estimators=20, random_state=0)),  # one weight per leaf
    ],
    ids=["forest-10", "extra-trees-10", "forest-2", "tree-2", "boosting-3", "boosting-2"],
)
def test_compacted_model_predicts_exactly_like_the_converted_one(data, est):
    X, y = _data(data)
    est.fit(X, y)
    raw, compact = _raw(est, X), _raw(est, X)
    stats = compact_tree_ensembles(compact)
    want, got = _run(raw, X), _run(compact, X)
    assert (want[0] == got[0]).all()
    assert np.array_equal(want[1], got[1])  # probabilities bit for bit
    # every class named before is still named after (ONNX Runtime's binary case depends on it)
    assert set(_leaf_attr(raw, "class_ids")) == set(_leaf_attr(compact, "class_ids"))
    assert stats["leaf_entries_before"] == len(_leaf_attr(raw, "class_weights"))
    assert stats["leaf_entries_after"] == len(_leaf_attr(compact, "class_weights"))
    # zeros stay only as the one placeholder a class keeps when it has no other weight
    assert _leaf_attr(compact, "class_weights").count(0.0) <= len(set(_leaf_attr(raw, "class_ids")))


def test_a_forest_of_pure_leaves_loses_its_zero_weights_and_default_attributes():
    X, y = _data("digits")
    est = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
    raw = _raw(est, X)
    model = to_onnx(est, X, True)  # the platform's conversion compacts
    weights = _leaf_attr(model, "class_weights")
    assert len(weights) < len(_leaf_attr(raw, "class_weights")) / 5  # ~1 of 10 classes per pure leaf
    assert _leaf_attr(model, "nodes_hitrates") is None
    assert _leaf_attr(model, "nodes_missing_value_tracks_true") is None
    assert len(model.SerializeToString()) < len(raw.SerializeToString()) / 2
    assert onnx_parity(model, est, X, True) == (pytest.approx(0.0, abs=1e-6), 1.0)


def test_missing_values_still_take_the_default_branch():
    X, y = _data("digits")
    est = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y)
    raw, compact = _raw(est, X), _raw(est, X)
    compact_tree_ensembles(compact)
    Xn = X[:50].copy()
    Xn[:, ::3] = np.nan
    assert np.array_equal(_run(raw, Xn)[1], _run(compact, Xn)[1])


def test_models_without_tree_ensembles_are_left_alone():
    X, y = _data("iris")
    model = _raw(LogisticRegression(max_iter=300).fit(X, y), X)
    before = model.SerializeToString()
    assert compact_tree_ensembles(model) == {"leaf_entries_before": 0, "leaf_entries_after": 0, "dropped_attributes": []}
    assert model.SerializeToString() == before
