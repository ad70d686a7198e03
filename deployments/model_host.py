"""ModelHost: the serving core of a ModelServer replica (an LRU of loaded models, payload
checks, batching, the model-call and I/O thread pools), as a plain class, so that the Gateway can
serve ONNX models in its own process with exactly the same code (serving.inline_onnx): a
DeploymentHandle call to another replica costs more CPU than the whole prediction.

Batching is tuned at run time through ``reconfigure``:
``{"batching": bool, "batch_max_requests": int, "batch_wait_s": float, "batch_max_rows": int}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from ray import serve

_SLOW_CALL_S = 0.002  # models whose calls take longer (moving average) go through the CallQueue


class ModelHost:
    def __init__(
        self, settings, loader, get_model: Callable[[str], Awaitable[Any]] | None = None, where: str = "gateway"
    ):
        """``loader``: an :class:`app.serving.loader.ModelLoader`; ``get_model(model_id)`` returns
        the loaded runtime from an LRU that calls :meth:`load` on a miss (the ModelServer passes
        Serve's multiplexing LRU); by default an LRU of this host's own
        (:class:`app.serving.model_cache.ModelCache`, serving.max_models_per_replica).
        ``where`` names the replica kind in the models-loaded metric."""
        from app.serving.batching import CallQueue
        from app.serving.model_cache import ModelCache

        self.settings = settings
        self.loader = loader
        s = settings.serving
        # Model I/O (loads, remote runtimes) and model calls off the event loop, each in its own
        # pool: loads waiting on the registry cache never hold up the calls of loaded models.
        self._io_pool = ThreadPoolExecutor(s.model_io_threads, thread_name_prefix="matih-model-io")
        self._call_pool = ThreadPoolExecutor(s.model_call_threads, thread_name_prefix="matih-model-call")
        self._configs: dict[str, Any] = {}  # model id -> the endpoint runtime config it was asked with
        self.get_model = get_model or ModelCache(self.load, s.max_models_per_replica)
        self._where = where
        # Models in the LRU, for the models-loaded metric. Serve's multiplexing LRU drops its
        # least recently used model before it loads one when full; ModelCache after the load.
        self._resident = 0
        self._evicts_first = get_model is not None
        self._in_flight = 0  # predict calls in this replica now (all on its one event loop)
        # Since start: predict requests, runtime calls made for them, and requests that went
        # through @serve.batch; requests / model_calls is how well batching stacks (see stats()).
        self._counts = {
            "requests": 0, "model_calls": 0, "batched_requests": 0, "slow_requests": 0,
            "in_flight_sum": 0, "max_in_flight": 0,
        }
        # Seconds per runtime call of each loaded model (moving average, by runtime id). Models
        # slower than _SLOW_CALL_S are batched by _slow_queue, off the event loop; see
        # app.serving.batching.CallQueue for why not @serve.batch.
        self._call_s: dict[int, float] = {}
        self._slow_queue = CallQueue(
            32, self.settings.serving.batch_max_rows, on_call=self._slow_call_done, executor=self._call_pool
        )
        self.reconfigure(
            {
                "batching": s.batching,
                "batch_max_requests": s.batch_max_requests,
                "batch_wait_s": s.batch_wait_s,
                "batch_max_rows": s.batch_max_rows,
            }
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._batching = bool(config.get("batching", self.settings.serving.batching))
        self._batch_max_rows = int(config.get("batch_max_rows", self.settings.serving.batch_max_rows))
        self._run_batch.set_max_batch_size(int(config.get("batch_max_requests", 32)))
        self._run_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_s", 0.002)))
        self._slow_queue.configure(int(config.get("batch_max_requests", 32)), self._batch_max_rows)

    async def load(self, model_id: str):
        """Open ``model_id`` in the I/O pool (the LRU's loader)."""
        from app import metrics

        most = self.settings.serving.max_models_per_replica
        if self._evicts_first and self._resident >= most:
            self._resident = most - 1
            metrics.models_resident(self._where, self._resident)
        runtime = await asyncio.get_running_loop().run_in_executor(
            self._io_pool, self.loader.load, model_id, self._configs.get(model_id)
        )
        self._resident = min(self._resident + 1, most)
        metrics.models_resident(self._where, self._resident)
        return runtime

    async def predict_model(
        self, model_id: str, payload: dict[str, Any], config: dict[str, Any] | None = None, batch: bool = True
    ) -> dict[str, Any]:
        """The prediction of ``model_id`` for ``payload``; a caller's error is raised. ``batch=False``:
        never wait for company in ``@serve.batch`` (an ensemble's members, called together in this
        replica: the other members' calls are company of other models, and waiting out
        batch_wait_s for them would add that wait to every ensemble request)."""
        from app.serving.batching import BatchItem, payload_rows
        from app.serving.payload import prepare

        self._in_flight += 1
        self._counts["in_flight_sum"] += self._in_flight
        self._counts["max_in_flight"] = max(self._counts["max_in_flight"], self._in_flight)
        try:
            if config:
                self._configs[model_id] = config
            runtime = await self.get_model(model_id)
            # A remote call (triton) waits on the network: the I/O pool; a request over
            # batch_max_rows is checked and called in the call pool, never on the event loop.
            max_rows = self.loader.max_rows(config)
            pool = self._io_pool if runtime.blocking_io else self._call_pool
            if runtime.blocking_io or payload_rows(payload) > self._batch_max_rows:
                return await self._in_pool(pool, runtime, payload, max_rows)
            matrix, probabilities = prepare(payload, runtime.signature, max_rows)  # bad input fails here, alone
            self._counts["requests"] += 1
            large = len(matrix) > self._batch_max_rows
            if self._batching and not large and self._is_slow(runtime):
                self._counts["slow_requests"] += 1
                return await self._slow_queue.submit(BatchItem(runtime, matrix, probabilities))
            if large or self._is_slow(runtime):  # slow model calls never run on the event loop
                return await self._in_pool(pool, runtime, payload, max_rows, (matrix, probabilities))
            # Batch only when there is company: a request alone in the replica would just wait out
            # batch_wait_s for nobody, so it runs at once. Requests that reached the replica while
            # a model call held its event loop are all ready now, but each only counts itself in
            # _in_flight when it runs: one turn of the loop lets them, so that a busy replica
            # stacks them instead of running them one by one as if each were alone.
            batching = self._batching and batch
            if batching and self._in_flight == 1:
                await asyncio.sleep(0)
            if not batching or self._in_flight == 1:
                self._counts["model_calls"] += 1
                return self._timed([runtime], partial(runtime.predict, matrix, probabilities=probabilities))
            out = await self._run_batch(BatchItem(runtime, matrix, probabilities))
            if isinstance(out, BaseException):  # the group failed; each caller gets the error
                raise out
            return out
        finally:
            self._in_flight -= 1

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _run_batch(self, items: list) -> list:
        from app.serving.batching import groups_of, run_grouped

        self._counts["batched_requests"] += len(items)
        self._counts["model_calls"] += _batch_metrics(items, groups_of(items))
        # On the event loop, on purpose: @serve.batch gathers the next batch while this one runs
        # only if the loop is free, so a model call here holding the loop is what lets requests
        # pile up into the next batch instead of into many one-request batches queued behind it.
        # (Slow models never come here: see _slow_queue.)
        return self._timed([item.runtime for item in items], partial(run_grouped, items))

    def _is_slow(self, runtime) -> bool:
        seconds = self._call_s.get(id(runtime))
        if seconds is None:  # no request served yet: the 1-row call timed when it was loaded
            seconds = runtime.warm_call_s or 0.0
        return seconds > _SLOW_CALL_S

    def _record(self, runtimes: list, seconds: float) -> None:
        if len(self._call_s) > 4096:  # ids of runtimes evicted long ago
            self._call_s.clear()
        for key in {id(r) for r in runtimes}:
            prev = self._call_s.get(key)
            self._call_s[key] = seconds if prev is None else 0.8 * prev + 0.2 * seconds

    async def _in_pool(
        self, pool, runtime, payload: dict[str, Any], max_rows: int, prepared=None
    ) -> dict[str, Any]:
        """Check ``payload`` (unless ``prepared``: checked and counted already) and call the
        model in a thread of ``pool``."""
        from app.serving.payload import prepare

        def run():
            matrix, probabilities = prepared or prepare(payload, runtime.signature, max_rows)
            started = time.perf_counter()
            return runtime.predict(matrix, probabilities=probabilities), time.perf_counter() - started

        out, seconds = await asyncio.get_running_loop().run_in_executor(pool, run)
        if prepared is None:
            self._counts["requests"] += 1
        self._counts["model_calls"] += 1
        self._record([runtime], seconds)
        return out

    def _timed(self, runtimes: list, call):
        """``call()`` on the event loop, timed into each runtime's moving average."""
        started = time.perf_counter()
        try:
            return call()
        finally:
            self._record(runtimes, time.perf_counter() - started)

    def _slow_call_done(self, items: list, seconds: float) -> None:
        from app.serving.batching import groups_of

        self._counts["model_calls"] += _batch_metrics(items, groups_of(items))
        self._record([item.runtime for item in items], seconds)

    async def stats(self) -> dict[str, int]:
        """Counts since this replica started: ``requests`` (predict calls that passed payload
        checks), ``model_calls`` (runtime calls made for them; one per group of a batch) and
        ``batched_requests`` (those that went through ``@serve.batch``), ``slow_requests``
        (those of slow models, through the CallQueue); ``in_flight_sum`` /
        ``requests`` is how many predict calls a request found in the replica on arrival,
        itself included, on average, and ``max_in_flight`` the most."""
        return dict(self._counts)


def _batch_metrics(items: list, groups: dict) -> int:
    """Record each model call of a batch (one per group) in the batch metrics; the number of calls."""
    from app import metrics

    for idxs in groups.values():
        metrics.batch(items[idxs[0]].runtime.model_name, sum(len(items[i].matrix) for i in idxs), len(idxs))
    return len(groups)
