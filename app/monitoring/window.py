"""The window of the prediction log a monitor reads, and the logged inputs as columns.

The log keeps each instance's inputs as one JSON object ``{feature: value}`` (``app.predlog
.layout``); monitors, performance and retraining need them as columns. :func:`decode_inputs`
parses a whole column of those objects at once with Arrow's JSON reader (C++, no Python
object per value), which is what keeps a 100k-row window's decode well under a second.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from app.errors import InvalidInput

__all__ = ["decode_inputs", "window_bounds", "as_float"]

_BLOCK = 4 << 20  # bytes per parse block: blocks are parsed on Arrow's threads


def decode_inputs(inputs: pa.Array | pa.ChunkedArray, columns: Sequence[str] | None = None) -> pa.Table:
    """One column per feature from a column of JSON objects (null rows give nulls), in the
    order of ``columns`` (None: every key seen, in first-seen order). A feature a row lacks
    is null there; a feature no row has is an all-null column. Numbers come back as int64 or
    double, strings as strings, as Arrow infers them per call (cast with :func:`as_float`)."""
    if isinstance(inputs, pa.ChunkedArray):
        inputs = inputs.combine_chunks() if inputs.num_chunks != 1 else inputs.chunk(0)
    n = len(inputs)
    if n == 0:
        return pa.table({c: pa.nulls(0) for c in (columns or [])})
    filled = pc.fill_null(inputs.cast(pa.string()), "{}")
    # One object per line: Arrow's JSON reader parses newline-delimited objects in C++.
    body = "\n".join(filled.to_pylist()).encode("utf-8")
    opts = pajson.ParseOptions(newlines_in_values=False, unexpected_field_behavior="infer")
    try:
        table = pajson.read_json(io.BytesIO(body), parse_options=opts,
                                 read_options=pajson.ReadOptions(block_size=_BLOCK))
    except pa.ArrowInvalid as exc:
        raise InvalidInput(f"the logged inputs are not JSON objects Arrow can read: {exc}") from None
    if table.num_rows != n:  # "{}" rows are kept as all-null rows, so this would be a bug
        raise InvalidInput(f"decoding the logged inputs gave {table.num_rows} rows for {n}")
    if columns is None:
        return table
    out = {}
    for name in columns:
        out[name] = table.column(name) if name in table.column_names else pa.nulls(n)
    return pa.table(out)


def as_float(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """A decoded column as float64 (null stays null); booleans count as 0/1. Raises
    InvalidInput for a column of strings that are not numbers."""
    if pa.types.is_floating(column.type):
        return column.cast(pa.float64())
    if pa.types.is_integer(column.type) or pa.types.is_boolean(column.type) or pa.types.is_null(column.type):
        return column.cast(pa.float64())
    try:
        return column.cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidInput(f"a logged feature of type {column.type} is not numeric: {exc}") from None


def window_bounds(window: dict, now: datetime, *, lookback_hours: float = 24 * 30) -> tuple[datetime, datetime, int | None]:
    """(since, until, newest rows or None) of a monitor window: ``{"hours": H}`` is the last H
    hours; ``{"rows": N}`` the newest N rows of the last ``lookback_hours``."""
    now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
    if "hours" in window and window["hours"] is not None:
        return now - timedelta(hours=float(window["hours"])), now, None
    if "rows" in window and window["rows"] is not None:
        return now - timedelta(hours=lookback_hours), now, int(window["rows"])
    raise InvalidInput("a window is {'rows': N} or {'hours': H}", details={"field": "window"})
