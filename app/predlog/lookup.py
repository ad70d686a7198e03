"""Which request ids the prediction log holds (and which traffic variant served each), read
straight from its parquet files.

A server request id carries the time it was issued (``app.predlog.ids``), so the hour
partition that holds its records is known without an index: a lookup reads only the
``request_id`` (and ``variant``) column of those few partitions, with a filter that lets parquet
skip row groups.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from app.errors import DependencyUnavailable
from app.predlog.ids import request_id_time
from app.predlog.layout import SHADOW_SUFFIX, hour_of, partition_dir
from app.storage.s3 import resolve_uri

__all__ = ["known_request_ids", "partition_files", "log_root", "request_variants"]

# A record's hour comes from its timestamp, taken when the request arrived, a moment before or
# after its id: an id this close to an hour's edge is looked for on both sides of it.
_EDGE = timedelta(seconds=60)
_ENDPOINT_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}({re.escape(SHADOW_SUFFIX)})?")
_RETRIES = 3  # a file compacted or rewritten away between listing and reading: list again


def log_root(settings) -> tuple[str, pafs.FileSystem]:
    """(path inside the filesystem, filesystem) of the prediction log's root."""
    return resolve_uri(settings.predlog.root, settings)


def partition_files(fs: pafs.FileSystem, root: str, endpoint: str, hour: str) -> list[str]:
    """The parquet files of one hour partition; none when the partition does not exist. Files
    being written (names starting with ``.`` or ``_``, or not ending in ``.parquet``) are left out."""
    selector = pafs.FileSelector(partition_dir(root, endpoint, hour), allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except OSError as exc:
        raise DependencyUnavailable(f"the prediction log at {root} is unreadable: {exc}") from None
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))
    )


def known_request_ids(settings, endpoint: str, request_ids: Iterable[str]) -> set[str]:
    """The ids among ``request_ids`` that the prediction log of ``endpoint`` holds. Strings that
    are not server ids, and ids whose hour partition does not exist, are not known."""
    return set(_lookup(settings, endpoint, request_ids, with_variant=False))


def request_variants(settings, endpoint: str, request_ids: Iterable[str]) -> dict[str, str]:
    """``{request_id: variant}`` for the ids among ``request_ids`` that the prediction log of
    ``endpoint`` holds: the traffic variant that served each (``""`` for an endpoint without a
    traffic plan). Ids the log does not hold are absent, as in :func:`known_request_ids`."""
    return _lookup(settings, endpoint, request_ids, with_variant=True)


def _lookup(settings, endpoint: str, request_ids: Iterable[str], *, with_variant: bool) -> dict[str, str]:
    if not _ENDPOINT_RE.fullmatch(endpoint):
        return {}
    by_hour: dict[str, set[str]] = defaultdict(set)
    for rid in set(request_ids):
        at = request_id_time(rid)
        if at is None:
            continue
        for hour in {hour_of(at - _EDGE), hour_of(at), hour_of(at + _EDGE)}:
            by_hour[hour].add(rid)
    if not by_hour:
        return {}
    root, fs = log_root(settings)
    found: dict[str, str] = {}
    for hour, ids in sorted(by_hour.items()):
        found.update(_ids_in_partition(fs, root, endpoint, hour, ids, with_variant))
    return found


def _ids_in_partition(
    fs: pafs.FileSystem, root: str, endpoint: str, hour: str, ids: set[str], with_variant: bool
) -> dict[str, str]:
    columns = ["request_id", "variant"] if with_variant else ["request_id"]
    for attempt in range(_RETRIES):
        files = partition_files(fs, root, endpoint, hour)
        if not files:
            return {}
        try:
            dataset = pads.dataset(files, format="parquet", filesystem=fs)
            table = dataset.to_table(columns=columns, filter=pc.field("request_id").isin(sorted(ids)))
        except FileNotFoundError:
            if attempt == _RETRIES - 1:
                raise DependencyUnavailable(
                    f"the prediction log's partition {endpoint}/{hour} kept changing while it was read; try again"
                ) from None
            continue
        except (OSError, pa.ArrowInvalid) as exc:
            raise DependencyUnavailable(f"the prediction log at {root} is unreadable: {exc}") from None
        rids = table.column("request_id").to_pylist()
        variants = table.column("variant").to_pylist() if with_variant else [""] * len(rids)
        return {rid: variant or "" for rid, variant in zip(rids, variants) if rid is not None}
    return {}
