import numpy as np

from app.errors import ModelError
from app.runtimes.base import ModelRuntime
from app.serving.signature import ModelSignature
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


class SlowModel(SumModel):
    """SumModel that takes a while per call (in the queue's worker thread)."""

    def __init__(self, seconds: float, **kw):
        super().__init__(**kw)
        self.seconds = seconds

    def predict(self, features, *, probabilities=False):
        import time

        time.sleep(self.seconds)
        return super().predict(features, probabilities=probabilities)


def test_call_queue_runs_a_lone_request_at_once_and_stacks_those_that_arrive_meanwhile():
    import asyncio

    from app.serving.batching import CallQueue

    model = SlowModel(0.05)
    calls: list[int] = []
    queue = CallQueue(max_items=32, max_rows=1000, on_call=lambda items, s: calls.append(len(items)))

    async def main():
        first = asyncio.create_task(queue.submit(BatchItem(model, m([1, 1]), False)))
        await asyncio.sleep(0.01)  # the first call is running: these wait and go together
        rest = [asyncio.create_task(queue.submit(BatchItem(model, m([i, 0]), False))) for i in range(10)]
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first["predictions"] == [2.0]
    assert [r["predictions"] for r in rest] == [[float(i)] for i in range(10)]
    assert calls == [1, 10] and model.calls == [(1, 2), (10, 2)]
    assert not queue.busy


def test_call_queue_limits_items_and_rows_per_call_and_fails_only_the_failing_call():
    import asyncio

    import pytest

    from app.serving.batching import CallQueue

    good, bad = SlowModel(0.02), SlowModel(0.02, fail=True)
    calls: list[int] = []
    queue = CallQueue(max_items=3, max_rows=4, on_call=lambda items, s: calls.append(len(items)))

    async def main():
        blocker = asyncio.create_task(queue.submit(BatchItem(good, m([0, 0]), False)))
        await asyncio.sleep(0.005)
        waiting = [asyncio.create_task(queue.submit(BatchItem(good, m([1, 0]), False))) for _ in range(4)]
        waiting.append(asyncio.create_task(queue.submit(BatchItem(good, m([1, 0], [1, 0], [1, 0]), False))))
        failing = asyncio.create_task(queue.submit(BatchItem(bad, m([1, 0]), False)))
        await blocker
        results = await asyncio.gather(*waiting)
        with pytest.raises(ModelError):
            await failing
        return results

    results = asyncio.run(main())
    assert [r["predictions"] for r in results[:4]] == [[1.0]] * 4
    assert results[4]["predictions"] == [1.0, 1.0, 1.0]
    # 1 alone; then at most 3 items / 4 rows a call: [1,1,1], [1, 3-row] -> 4 rows, [bad]
    assert calls == [1, 3, 2, 1]


class FiveMsModel(SumModel):
    def predict(self, features, *, probabilities=False):
        import time

        time.sleep(0.005)
        return super().predict(features, probabilities=probabilities)


def test_warm_up_times_a_steady_call_so_a_server_knows_the_cost_before_any_request():
    fast, slow = SumModel(), FiveMsModel()
    for model in (fast, slow):
        assert model.warm_call_s is None
        model.load(None, {})
        model.warm_up()
        assert model.calls == [(1, 2), (1, 2)]  # one call to initialise, one timed
    assert fast.warm_call_s > 0 and slow.warm_call_s >= 0.005  # the sleep is a floor, not a timing
