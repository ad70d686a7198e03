"""Bounded waits on the request path: timeouts become errors of the hierarchy (503 with
Retry-After for a dependency, 504 for the request), the Gateway's deadline answers before
Serve's, and model calls run in the replica's pools, never on its event loop."""

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import ray
from fastapi import FastAPI

from app import errors as E
from app.api.deadline import RequestDeadline, deadline_s
from app.api.errors import error_response
from app.runtimes.base import ModelRuntime, ModelSignature
from app.serving.batching import BatchItem, CallQueue, payload_rows
from app.waits import bounded


def test_a_wait_past_its_limit_is_a_503_with_retry_after_naming_what_was_slow():
    async def main():
        assert await bounded(asyncio.sleep(0, "ok"), 1.0, "the job scheduler") == "ok"
        started = time.perf_counter()
        with pytest.raises(E.DependencyTimeout) as info:
            await bounded(asyncio.sleep(30), 0.05, "the job scheduler", retry_after_s=3)
        return info.value, time.perf_counter() - started

    err, seconds = asyncio.run(main())
    assert seconds < 1.0
    assert "the job scheduler" in err.message and err.code == "dependency_timeout"
    resp = error_response(err)
    assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
    assert json.loads(resp.body)["details"]["timeout_s"] == 0.05


def test_the_deadline_honours_a_shorter_client_timeout_only_and_keeps_a_margin():
    h = lambda v: [(b"x-request-timeout-seconds", v)]  # noqa: E731
    assert deadline_s([], 60) == 59  # a tenth, at most a second, before Serve's own timeout
    assert deadline_s(h(b"2"), 60) == pytest.approx(1.8)
    assert deadline_s(h(b"600"), 60) == 59  # never more than the server's limit
    for ignored in (b"0", b"-1", b"nan", b"soon", b"inf"):
        assert deadline_s(h(ignored), 60) == 59, ignored


def _app(limit_s: float) -> FastAPI:
    api = FastAPI()

    @api.get("/slow")
    async def slow():
        await asyncio.sleep(30)

    @api.get("/fast")
    async def fast():
        return {"ok": True}

    api.add_middleware(RequestDeadline, limit_s=limit_s)
    return api


def test_a_request_past_its_deadline_gets_our_504_body_and_others_are_untouched():
    async def main():
        transport = httpx.ASGITransport(app=_app(60))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            started = time.perf_counter()
            r = await c.get("/slow", headers={"x-request-timeout-seconds": "0.3"})
            seconds = time.perf_counter() - started
            return r, seconds, await c.get("/fast", headers={"x-request-timeout-seconds": "0.3"})

    r, seconds, fast = asyncio.run(main())
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["code"] == "request_timeout" and "0.27" in body["error"], body
    assert 0.25 < seconds < 2.0
    assert fast.status_code == 200 and fast.json() == {"ok": True}


class _SlowModel(ModelRuntime):
    """A tiny real runtime whose call takes ``seconds`` and records the thread it ran in."""

    name = "slow"

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.threads: list[str] = []
        self.signature = ModelSignature(n_features=1)

    def load(self, model_dir, metadata):
        pass

    def predict(self, features, *, probabilities=False):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return {"predictions": features[:, 0].tolist()}


def test_call_queue_calls_run_in_the_model_call_pool_while_the_event_loop_stays_free():
    model = _SlowModel(0.3)
    pool = ThreadPoolExecutor(1, thread_name_prefix="matih-model-call")
    queue = CallQueue(32, 256, executor=pool)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.get_running_loop().create_task(ticker())
        out = await asyncio.gather(
            *(queue.submit(BatchItem(model, np.full((1, 1), i, dtype=np.float32), False)) for i in range(3))
        )
        tick.cancel()
        return out, ticks

    try:
        out, ticks = asyncio.run(main())
    finally:
        pool.shutdown()
    assert [o["predictions"] for o in out] == [[0.0], [1.0], [2.0]]
    assert model.threads and all(t.startswith("matih-model-call") for t in model.threads), model.threads
    assert ticks >= 20  # ~0.6 s of calls; the loop ticked all along


def test_payload_rows_counts_rows_without_reading_values():
    assert payload_rows({"instances": [[1, 2]] * 300}) == 300
    assert payload_rows({"tensor": np.zeros((7, 3))}) == 7
    assert payload_rows({"inputs": {"a": [1, 2, 3], "b": [4, 5, 6]}}) == 3
    assert payload_rows({"instances": 5}) == 0 and payload_rows({}) == 0


# -- the Gateway's ModelServer call: bounded, and sent again when its replica died ------------
# A stand-in for Serve's DeploymentHandle (Ray's API, not ours): each call takes the next
# behaviour from a script.


class _Handle:
    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def options(self, **_):
        return self

    @property
    def predict(self):
        return self

    def remote(self, payload, config):
        self.calls += 1
        step = self.script.pop(0) if self.script else "ok"

        async def run():
            if step == "dead":
                raise ray.exceptions.ActorDiedError()
            if step == "slow":
                await asyncio.sleep(30)
            return {"predictions": [1]}

        return run()


class _Model:
    model_id = "m/1"


def test_a_dead_replica_is_retried_and_a_slow_model_call_is_a_504():
    from deployments.gateway import _ServePredictor

    async def main():
        ok = _ServePredictor(_Handle(["dead", "dead"]), grpc=False, timeout_s=5, retries=2)
        assert await ok.predict(_Model(), {"instances": [[1]]}) == {"predictions": [1]}
        assert ok.handle.calls == 3

        gone = _ServePredictor(_Handle(["dead"] * 5), grpc=False, timeout_s=5, retries=1)
        with pytest.raises(E.DependencyUnavailable) as unavailable:
            await gone.predict(_Model(), {"instances": [[1]]})
        assert gone.handle.calls == 2

        slow = _ServePredictor(_Handle(["slow"]), grpc=False, timeout_s=0.2, retries=2)
        started = time.perf_counter()
        with pytest.raises(E.RequestTimeout) as timeout:
            await slow.predict(_Model(), {"instances": [[1]]})
        return unavailable.value, timeout.value, time.perf_counter() - started

    unavailable, timeout, seconds = asyncio.run(main())
    assert error_response(unavailable).status_code == 503
    assert error_response(timeout).status_code == 504 and "m/1" in timeout.message
    assert seconds < 1.5
