"""Rows pushed into a Feast push source: ``POST /v1/features/push`` and the StreamIngestor's
micro-batches. Both go through :func:`push_rows`: the rows are checked against the feature
views fed by the push source (their entity join keys, features and the batch source's event
timestamp), converted to the views' types, and written with Feast's push API
(``FeatureStore.push``) to the online store, the offline store (the batch source's parquet file,
which Feast's file offline store rewrites with the rows appended) or both.

The online store keeps, per entity key, the row with the latest event time: pushing a row
again (a stream's redelivery after a restart) changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from app.errors import InvalidInput
from app.timestamps import parse_timestamp

# Most rows of one POST /v1/features/push (a larger upload belongs in the batch source's file).
MAX_PUSH_ROWS = 10_000  # the default of settings.features.push_max_rows
PUSH_TARGETS = ("online", "offline", "online_and_offline")


@dataclass(frozen=True)
class PushSpec:
    """What a push source's rows must hold: the columns of the feature views it feeds."""

    name: str
    views: tuple[str, ...]
    timestamp_field: str
    created_field: str | None
    # column -> kind: int | float | str | bool | timestamp | bytes | any
    columns: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RowError:
    """Why row ``index`` cannot be pushed: ``field`` names the column."""

    index: int
    field: str
    reason: str

    def message(self) -> str:
        return f"rows[{self.index}].{self.field}: {self.reason}"


def _kind(dtype: Any) -> str:
    name = str(dtype)
    if name == "UnixTimestamp":
        return "timestamp"
    if name in ("Int32", "Int64"):
        return "int"
    if name in ("Float32", "Float64"):
        return "float"
    if name == "String":
        return "str"
    if name == "Bool":
        return "bool"
    if name == "Bytes":
        return "bytes"
    return "any"  # lists, maps, structs: passed to Feast as they came


def push_spec(store, push_source: str) -> PushSpec:
    """The :class:`PushSpec` of ``push_source`` from the registry; InvalidInput (field
    ``push_source``) when it is not a push source that feeds a feature view."""
    from feast.data_source import PushSource

    views = [
        fv for fv in store.list_feature_views(allow_cache=True)
        if isinstance(fv.stream_source, PushSource) and fv.stream_source.name == push_source
    ]
    if not views:
        raise InvalidInput(
            f"push_source: {push_source!r} is not a push source feeding a feature view of project "
            f"{store.project!r}; declare it with POST /v1/features/sources (kind push) and a feature view on it",
            details={"field": "push_source"},
        )
    source = views[0].stream_source
    batch = source.batch_source
    ts = batch.timestamp_field
    created = batch.created_timestamp_column or None
    columns: dict[str, str] = {}
    for fv in views:
        for col in fv.entity_columns:
            columns[col.name] = _kind(col.dtype)
        for feat in fv.features:
            columns[feat.name] = _kind(feat.dtype)
    columns.pop(ts, None)
    if created:
        columns.pop(created, None)
    return PushSpec(push_source, tuple(sorted(fv.name for fv in views)), ts, created, columns, dict(source.tags or {}))


def to_timestamp(value: Any) -> datetime:
    """A pushed row's event time: ISO 8601 (no offset = UTC) or epoch seconds, a number or a
    numeric string (app.timestamps, the parser feedback rows use too)."""
    return parse_timestamp(value, numeric_strings=True)


def _convert(kind: str, value: Any) -> Any:
    if value is None:
        if kind in ("float", "str", "any", "bytes"):
            return None
        raise ValueError("must not be null")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected an integer, not {value!r}")
            return int(value)
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if kind == "str":
        if isinstance(value, (dict, list)):
            raise ValueError("expected a string")
        return str(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if value in (0, 1) or value in ("true", "false", "0", "1"):
            return value in (1, "true", "1")
        raise ValueError(f"expected a boolean, not {value!r}")
    if kind == "timestamp":
        return to_timestamp(value)
    return value


_PANDAS_DTYPE = {"int": "int64", "float": "float64", "bool": "bool"}


def frame(spec: PushSpec, rows: list[Any]) -> tuple[pd.DataFrame, list[RowError]]:
    """The rows that convert, as a DataFrame of the spec's columns (event timestamps in UTC),
    and an error for each one that does not (one per row: its first bad field)."""
    cols: dict[str, list[Any]] = {name: [] for name in spec.columns}
    stamps: list[datetime] = []
    created: list[datetime] = []
    errors: list[RowError] = []
    names = list(spec.columns.items())
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            errors.append(RowError(i, "", "a row is a JSON object of column -> value"))
            continue
        try:
            col = spec.timestamp_field
            ts = to_timestamp(row[col]) if col in row else None
            if ts is None:
                raise KeyError(col)
            values = []
            for col, kind in names:
                if col not in row:
                    raise KeyError(col)
                values.append(_convert(kind, row[col]))
            made = None
            if spec.created_field:
                col = spec.created_field
                made = to_timestamp(row[col]) if row.get(col) is not None else datetime.now(timezone.utc)
        except KeyError:
            errors.append(RowError(i, col, "missing"))
            continue
        except (ValueError, TypeError, OverflowError) as exc:
            errors.append(RowError(i, col, str(exc) or "bad value"))
            continue
        stamps.append(ts)
        if spec.created_field:
            created.append(made)
        for (name, _), value in zip(names, values):
            cols[name].append(value)
    data: dict[str, Any] = {}
    for name, kind in spec.columns.items():
        dtype = _PANDAS_DTYPE.get(kind)
        if kind == "timestamp":
            data[name] = pd.to_datetime(pd.Series(cols[name], dtype=object), utc=True)
        elif dtype == "float64":
            data[name] = pd.Series([math.nan if v is None else v for v in cols[name]], dtype=dtype)
        else:
            data[name] = pd.Series(cols[name], dtype=dtype or object)
    data[spec.timestamp_field] = pd.to_datetime(pd.Series(stamps, dtype=object), utc=True)
    if spec.created_field:
        data[spec.created_field] = pd.to_datetime(pd.Series(created, dtype=object), utc=True)
    return pd.DataFrame(data), errors


def _push_mode(to: str):
    from feast.data_source import PushMode

    if to not in PUSH_TARGETS:
        raise InvalidInput(f"to: {to!r} is not one of {', '.join(PUSH_TARGETS)}", details={"field": "to"})
    return {"online": PushMode.ONLINE, "offline": PushMode.OFFLINE,
            "online_and_offline": PushMode.ONLINE_AND_OFFLINE}[to]


def write_frame(store, spec: PushSpec, df: pd.DataFrame, to: str = "online") -> None:
    """Write converted rows through Feast's push API (nothing for no rows)."""
    mode = _push_mode(to)
    if df.empty:
        return
    try:
        store.push(spec.name, df, to=mode)
    except ValueError as exc:  # Feast's column checks (the offline file's columns differ)
        raise InvalidInput(f"rows: {exc}", details={"field": "rows"}) from exc


def push_rows(store, push_source: str, rows: list[Any], to: str = "online",
              max_rows: int = MAX_PUSH_ROWS) -> dict[str, Any]:
    """Check, convert and push ``rows`` (all or none: InvalidInput naming the first bad
    field); returns ``{"push_source", "rows", "to", "views"}``."""
    _push_mode(to)
    if not isinstance(rows, list) or not rows:
        raise InvalidInput("rows: give a non-empty list of rows (JSON objects)", details={"field": "rows"})
    if len(rows) > max_rows:
        raise InvalidInput(f"rows: {len(rows)} rows is more than the {max_rows} one push may carry; "
                           "split them, or write the batch source's file", details={"field": "rows"})
    spec = push_spec(store, push_source)
    df, errors = frame(spec, rows)
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more rows)" if len(errors) > 1 else ""
        raise InvalidInput(f"{first.message()}{more}; needed: {', '.join([spec.timestamp_field, *spec.columns])}",
                           details={"field": f"rows[{first.index}].{first.field}"})
    write_frame(store, spec, df, to)
    return {"push_source": push_source, "rows": len(df), "to": to, "views": list(spec.views)}
