"""Cross-request batching: requests for the same loaded model are stacked into one matrix,
predicted in one runtime call, and split back. ModelServer runs this under ``@serve.batch``;
requests for different models in one batch are grouped, never mixed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.runtimes.base import ModelRuntime


@dataclass
class BatchItem:
    runtime: ModelRuntime
    matrix: np.ndarray
    probabilities: bool


def payload_rows(payload: dict[str, Any]) -> int:
    """Rows of a predict payload (``instances``, ``tensor`` or ``inputs`` columns), counted
    without reading its values, so that a large request is known before any work on it;
    0 for a shape this does not know (the payload check then names what is wrong)."""
    for key in ("instances", "tensor"):
        if key in payload:
            try:
                return len(payload[key])
            except TypeError:
                return 0
    inputs = payload.get("inputs")
    if isinstance(inputs, dict) and inputs:
        try:
            return len(next(iter(inputs.values())))
        except TypeError:
            return 0
    return 0


def rows_of(items: list[BatchItem]) -> int:
    """Batch size in rows, so one large request does not ride with many others."""
    return sum(len(item.matrix) for item in items)


def groups_of(items: list[BatchItem]) -> dict[tuple[int, bool], list[int]]:
    """Item indexes by (runtime, probabilities): each group is one runtime call."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((id(item.runtime), item.probabilities), []).append(i)
    return groups


def run_grouped(items: list[BatchItem]) -> list[dict[str, Any] | BaseException]:
    """One result per item, in order. A failing group fails only its own items."""
    results: list[dict[str, Any] | BaseException | None] = [None] * len(items)
    for (_, probabilities), idxs in groups_of(items).items():
        runtime = items[idxs[0]].runtime
        try:
            if len(idxs) == 1:
                results[idxs[0]] = runtime.predict(items[idxs[0]].matrix, probabilities=probabilities)
                continue
            stacked = np.concatenate([items[i].matrix for i in idxs])
            out = runtime.predict(stacked, probabilities=probabilities)
        except BaseException as exc:  # noqa: BLE001 - handed back to each caller of the group
            for i in idxs:
                results[i] = exc
            continue
        start = 0
        for i in idxs:
            n = len(items[i].matrix)
            results[i] = {key: value[start : start + n] for key, value in out.items()}
            start += n
    return results  # type: ignore[return-value]


class CallQueue:
    """Continuous batching for slow models, one runtime call at a time.

    A request that finds nothing running is called at once, alone. Requests that arrive while
    a call runs wait, and the next call takes all of them (up to ``max_items``, at most
    ``max_rows`` rows, grouped by :func:`run_grouped`). Calls run in a thread of ``executor``
    (the replica's model-call pool; None: asyncio's default), so the event loop keeps taking in
    requests meanwhile.

    Why not ``@serve.batch`` for these: it forms the next batch while the current one is still
    running (its ``max_concurrent_batches`` only limits how many run), so with the call off the
    event loop every batch held the one or two requests of a short wait, and they then ran one
    after another. ``@serve.batch`` stays for models cheap enough to run on the event loop,
    where a running call holds back batch forming until it returns.
    """

    def __init__(self, max_items: int, max_rows: int, on_call: Any = None, executor: Any = None):
        self.max_items, self.max_rows = max_items, max_rows
        self.on_call = on_call  # on_call(items, seconds): after each call (counts, timings)
        self.executor = executor  # a concurrent.futures.Executor for the calls
        self._pending: list[tuple[BatchItem, Any]] = []
        self._running = False
        self._task: Any = None  # the running drain (held: the loop keeps only weak references)

    @property
    def busy(self) -> bool:
        return self._running

    def configure(self, max_items: int, max_rows: int) -> None:
        self.max_items, self.max_rows = max_items, max_rows

    async def submit(self, item: BatchItem) -> dict[str, Any]:
        import asyncio

        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._running:
            self._running = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    def _take(self) -> list[tuple[BatchItem, Any]]:
        taken, rows = [], 0
        while self._pending and len(taken) < self.max_items:
            n = len(self._pending[0][0].matrix)
            if taken and rows + n > self.max_rows:
                break
            taken.append(self._pending.pop(0))
            rows += n
        return taken

    async def _drain(self) -> None:
        import asyncio
        import time

        try:
            while self._pending:
                batch = self._take()
                items = [item for item, _ in batch]
                started = time.perf_counter()
                try:
                    results = await asyncio.get_running_loop().run_in_executor(self.executor, run_grouped, items)
                except BaseException as exc:  # noqa: BLE001 - every waiter of this call gets it
                    results = [exc] * len(batch)
                if self.on_call is not None:
                    self.on_call(items, time.perf_counter() - started)
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():  # the caller may have gone (cancelled)
                        future.set_result(result)
        finally:
            self._running = False
            for _, future in self._pending:  # only if the loop above failed
                if not future.done():
                    future.set_result(RuntimeError("the model call queue stopped"))
            self._pending.clear()
