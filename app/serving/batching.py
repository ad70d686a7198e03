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
