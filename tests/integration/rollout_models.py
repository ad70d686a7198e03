"""Misbehaving models for the rollout tests: an iris classifier that fails a share of its
calls or sleeps before answering. Registered as trusted sklearn pickles and served by the
native runtime, which imports this module in the ModelServer replicas (the test session's
PYTHONPATH holds the repository)."""

from __future__ import annotations

import random
import time

from sklearn.base import BaseEstimator, ClassifierMixin


class Misbehaving(ClassifierMixin, BaseEstimator):
    def __init__(self, fail_rate: float = 0.0, sleep_ms: float = 0.0):
        self.fail_rate = fail_rate
        self.sleep_ms = sleep_ms

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        self.inner_ = LogisticRegression(max_iter=300).fit(X, y)
        self.classes_ = self.inner_.classes_
        self.n_features_in_ = self.inner_.n_features_in_
        return self

    def predict(self, X):
        if self.sleep_ms:
            time.sleep(self.sleep_ms / 1000.0)
        if self.fail_rate and random.random() < self.fail_rate:
            raise RuntimeError("this model fails now and then")
        return self.inner_.predict(X)

    def predict_proba(self, X):
        return self.inner_.predict_proba(X)


def pickled(fail_rate: float = 0.0, sleep_ms: float = 0.0) -> bytes:
    import pickle

    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    return pickle.dumps(Misbehaving(fail_rate, sleep_ms).fit(X, y))
