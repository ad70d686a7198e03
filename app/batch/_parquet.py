"""Parquet input of a batch job as a Ray Data datasource of contiguous row ranges.

Why not ``ray.data.read_parquet``: it runs a sampling task while the dataset is built
(before any predictor starts), and it splits work by file, so one large file becomes one
read task whose output is then split. Here the row-group layout comes from the footers the
job reads anyway, the rows are cut into as many ranges as the job wants blocks, in order,
and each read task reads only the row groups of its own range. The read tasks have the
predictors' resources, so Ray Data fuses them into the predictor actors: a block is read
where it is predicted, with no read worker to start and no extra hop through the object store.

This module is imported in every predictor actor (the read tasks run there): pyarrow and
Ray Data's datasource interface only.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


@dataclass(frozen=True)
class _RowGroup:
    path: str
    index: int
    start: int  # first row, counted over all files in order
    rows: int


def parquet_row_groups(path: str, filesystem) -> tuple[list[_RowGroup], Any]:
    """Every row group of a parquet file or folder, in row order (files in name order), and
    the schema. Reads footers only."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(path, filesystem=filesystem, format="parquet")
    groups: list[_RowGroup] = []
    start = 0
    for fragment in sorted(dataset.get_fragments(), key=lambda f: f.path):
        meta = fragment.metadata
        for index in range(meta.num_row_groups):
            rows = meta.row_group(index).num_rows
            if rows:
                groups.append(_RowGroup(fragment.path, index, start, rows))
                start += rows
    return groups, dataset.schema


def read_range(filesystem, groups: list[_RowGroup], first: int, stop: int, columns: list[str]):
    """Rows [first, stop) as pyarrow tables, one per row group touched."""
    import pyarrow.parquet as pq

    files: dict[str, Any] = {}
    for g in groups:
        pf = files.get(g.path)
        if pf is None:
            pf = files[g.path] = pq.ParquetFile(filesystem.open_input_file(g.path))
        table = pf.read_row_group(g.index, columns=columns)
        lo, hi = max(first, g.start) - g.start, min(stop, g.start + g.rows) - g.start
        yield table.slice(lo, hi - lo)
    for pf in files.values():
        pf.close()


class ParquetRowRanges(Datasource):
    """``columns`` of the row groups in ``groups``, cut into ``parallelism`` contiguous,
    near-equal row ranges (one read task each), in row order."""

    def __init__(self, groups: list[_RowGroup], filesystem, columns: list[str], schema, row_bytes: int):
        super().__init__()
        self._groups = groups
        self._fs = filesystem
        self._columns = list(columns)
        self._schema = schema
        self._row_bytes = row_bytes
        self._starts = [g.start for g in groups]
        self._rows = groups[-1].start + groups[-1].rows if groups else 0

    def get_name(self) -> str:
        return "ParquetRowRanges"

    def estimate_inmemory_data_size(self) -> int:
        return self._rows * self._row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        n = max(1, min(parallelism, self._rows))
        tasks = []
        for k in range(n if self._rows else 0):
            first, stop = self._rows * k // n, self._rows * (k + 1) // n
            lo = bisect.bisect_right(self._starts, first) - 1
            hi = bisect.bisect_left(self._starts, stop)
            groups = self._groups[lo:hi]
            meta = BlockMetadata(
                num_rows=stop - first,
                size_bytes=(stop - first) * self._row_bytes,
                exec_stats=None,
                input_files=sorted({g.path for g in groups}),
            )
            fs, columns = self._fs, self._columns
            tasks.append(
                ReadTask(
                    lambda fs=fs, groups=groups, first=first, stop=stop, columns=columns: read_range(
                        fs, groups, first, stop, columns
                    ),
                    meta,
                    schema=self._schema,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks
