"""Reading the prediction log: pages for the HTTP API (:func:`query`) and a Ray Data dataset
for the drift monitor and training jobs (:func:`read`).

Both read only the hour partitions of the time range and de-duplicate on (request_id,
instance): compaction may briefly leave a record in two files (``app.predlog.service``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from app.pagination import (
    decode_page_token,
    encode_page_token,
    int_field,
    invalid_page_token,
    str_field,
    time_field,
)
from app.predlog.layout import SCHEMA, endpoint_dir, hours_between, partition_dir
from app.predlog.service import check_endpoint_name, dedupe_sorted, is_log_file
from app.settings import Settings
from app.storage.s3 import resolve_uri

if TYPE_CHECKING:
    import ray.data
    from pyarrow import fs as pafs

_ATTEMPTS = 3  # a file may vanish between listing and reading (compaction, erasure): list again


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _filesystem(settings: Settings) -> tuple[str, pafs.FileSystem]:
    return resolve_uri(settings.predlog.root, settings)


def log_exists(settings: Settings, endpoint: str) -> bool:
    """Whether the log has a folder for ``endpoint`` (it may outlive the endpoint itself)."""
    from pyarrow import fs as pafs

    root, fs = _filesystem(settings)
    return fs.get_file_info(endpoint_dir(root, check_endpoint_name(endpoint))).type == pafs.FileType.Directory


def _partition_paths(fs, root: str, endpoint: str, since: datetime, until: datetime) -> list[str]:
    from pyarrow import fs as pafs

    wanted = set(hours_between(since, until))
    prefix = "hour="
    infos = fs.get_file_info(pafs.FileSelector(endpoint_dir(root, endpoint), allow_not_found=True))
    hours = sorted(i.base_name[len(prefix):] for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name[len(prefix):] in wanted)
    return [partition_dir(root, endpoint, h) for h in hours]


def _read_partition(fs, directory: str, expr) -> pa.Table:
    from pyarrow import fs as pafs

    for attempt in range(_ATTEMPTS):
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
                       if is_log_file(i))
        if not files:
            return SCHEMA.empty_table()
        try:
            return pads.dataset(files, schema=SCHEMA, format="parquet", filesystem=fs).to_table(filter=expr)
        except (FileNotFoundError, OSError):
            if attempt == _ATTEMPTS - 1:
                raise
    return SCHEMA.empty_table()


def _item(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("inputs", "prediction", "features"):
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    row["timestamp"] = row["timestamp"].isoformat()
    return row


def query(
    settings: Settings, endpoint: str, since: datetime, until: datetime, variant: str | None = None,
    limit: int = 100, page_token: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of ``endpoint``'s records with ``since <= timestamp < until`` (and ``variant``
    when given), ordered by (timestamp, request_id, instance): (items, next page token or None).
    Items carry ``inputs`` and ``prediction`` decoded from JSON and ``timestamp`` in ISO 8601.
    An endpoint without records (or without a folder) has an empty page."""
    check_endpoint_name(endpoint)
    since, until = _utc(since), _utc(until)
    key = decode_page_token(page_token, time_field, str_field, int_field)
    start = since
    if key is not None:
        try:
            start = _utc(key[0])
        except OverflowError:
            raise invalid_page_token(page_token, "its time is out of range") from None
        if not since <= start < until:
            raise invalid_page_token(page_token, "it is not a page of this time range")
    root, fs = _filesystem(settings)
    ts_type = SCHEMA.field("timestamp").type
    f = pc.field
    expr = (f("timestamp") >= pa.scalar(since, ts_type)) & (f("timestamp") < pa.scalar(until, ts_type))
    if variant is not None:
        expr = expr & (f("variant") == variant)
    if key is not None:
        ts = pa.scalar(start, ts_type)
        expr = expr & ((f("timestamp") > ts) | ((f("timestamp") == ts) & (
            (f("request_id") > key[1]) | ((f("request_id") == key[1]) & (f("instance") > key[2])))))
    items: list[dict[str, Any]] = []
    for directory in _partition_paths(fs, root, endpoint, start, until):
        table = dedupe_sorted(_read_partition(fs, directory, expr))
        items.extend(table.slice(0, limit + 1 - len(items)).to_pylist())
        if len(items) > limit:
            break
    nxt = None
    if len(items) > limit:
        items = items[:limit]
        last = items[-1]
        nxt = encode_page_token(last["timestamp"].isoformat(), last["request_id"], last["instance"])
    return [_item(r) for r in items], nxt


def read(
    endpoint: str, since: datetime, until: datetime, *, settings: Settings | None = None
) -> ray.data.Dataset:
    """``endpoint``'s records with ``since <= timestamp < until`` as a Ray Data dataset (the
    columns of ``app.predlog.layout.SCHEMA``; ``inputs`` and ``prediction`` are JSON text).

    Reads only the hour partitions of the range; a range without records gives an empty
    dataset. Rows are not de-duplicated here: a record caught mid-compaction may appear twice,
    so drop duplicates of (request_id, instance) where exact counts matter."""
    import ray.data
    from ray.data.expressions import col, lit

    from app.settings import load_settings

    settings = settings or load_settings(need_admin_token=False)
    check_endpoint_name(endpoint)
    since, until = _utc(since), _utc(until)
    root, fs = _filesystem(settings)
    paths = _partition_paths(fs, root, endpoint, since, until)
    if not paths:
        return ray.data.from_arrow(SCHEMA.empty_table())
    ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, file_extensions=["parquet"])
    return ds.filter(expr=(col("timestamp") >= lit(since)) & (col("timestamp") < lit(until)))
