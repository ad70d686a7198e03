import numpy as np

from app.errors import ModelError
from app.runtimes.base import ModelRuntime, ModelSignature
from app.serving.batching import BatchItem, run_grouped, rows_of


class SumModel(ModelRuntime):
    """A tiny real runtime: predicts the row sum, records the shapes it was called with."""

    name = "sum"

    def __init__(self, fail: bool = False):
        super().__init__()
        self.calls: list[tuple[int, int]] = []
        self.fail = fail

    def load(self, model_dir, metadata):
        self.signature = ModelSignature(n_features=2)

    def predict(self, features, *, probabilities=False):
        if self.fail:
            raise ModelError("broken model")
        self.calls.append(features.shape)
        out = {"predictions": features.sum(axis=1).tolist()}
        if probabilities:
            out["probabilities"] = [[1.0] for _ in range(len(features))]
        return out


def m(*rows):
    return np.asarray(rows, dtype=np.float32)


def test_requests_for_one_model_run_in_one_call_and_split_back():
    a = SumModel()
    items = [BatchItem(a, m([1, 2]), False), BatchItem(a, m([3, 4], [5, 6]), False), BatchItem(a, m([0, 1]), False)]
    out = run_grouped(items)
    assert a.calls == [(4, 2)]
    assert [o["predictions"] for o in out] == [[3.0], [7.0, 11.0], [1.0]]
    assert rows_of(items) == 4


def test_models_and_output_options_are_never_mixed_and_failures_stay_in_their_group():
    a, b, broken = SumModel(), SumModel(), SumModel(fail=True)
    items = [
        BatchItem(a, m([1, 1]), False),
        BatchItem(b, m([2, 2]), False),
        BatchItem(a, m([3, 3]), True),
        BatchItem(broken, m([4, 4]), False),
        BatchItem(a, m([5, 5]), False),
    ]
    out = run_grouped(items)
    assert out[0]["predictions"] == [2.0] and out[4]["predictions"] == [10.0]
    assert out[1]["predictions"] == [4.0]
    assert out[2]["probabilities"] == [[1.0]]
    assert isinstance(out[3], ModelError)
    assert sorted(a.calls) == [(1, 2), (2, 2)]
