"""The writing side of the prediction log, in-process and without Ray: what the PredictionLog
actor drives (``actors/prediction_log.py``) and unit tests use directly.

Records arrive in batches from the Gateway replicas (:meth:`PredictionLogService.write`), wait
in memory, and are written by :meth:`~PredictionLogService.flush` as one parquet file per
endpoint and hour (``app.predlog.layout``). Maintenance rewrites files so that a concurrent
reader never loses a record: a file is replaced only after its replacement is complete (a
rename on a local folder, one PUT on S3), and a record may at most be seen twice for a moment
(merged file written, small files not yet deleted), which readers remove by de-duplicating on
(request_id, instance).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from app import metrics
from app.errors import DependencyUnavailable, InvalidInput
from app.names import NAME_PATTERN
from app.predlog.convert import to_table
from app.predlog.ids import new_request_id, request_id_time
from app.predlog.layout import (
    ENDPOINT_KEY,
    HOUR_FORMAT,
    HOUR_KEY,
    SCHEMA,
    SHADOW_SUFFIX,
    endpoint_dir,
    partition_dir,
    parse_hour,
)
from app.predlog.records import PredictionRecord
from app.settings import Settings
from app.storage.s3 import resolve_uri

log = logging.getLogger(__name__)

_NAME_RE = re.compile(NAME_PATTERN)
SORT_KEYS = [("timestamp", "ascending"), ("request_id", "ascending"), ("instance", "ascending")]
# An hour partition counts as closed (compacted into one file whatever its file count) this
# long after the hour ended: records of it may still be on their way from a replica's buffer.
CLOSED_AFTER_S = 300.0
COMPRESSION = "zstd"


def check_endpoint_name(endpoint: str) -> str:
    """``endpoint`` when it is a name an endpoint can have, or the shadow log of one
    (``layout.shadow_log``), and so a safe path component."""
    base = endpoint[: -len(SHADOW_SUFFIX)] if isinstance(endpoint, str) and endpoint.endswith(SHADOW_SUFFIX) else endpoint
    if not isinstance(base, str) or not _NAME_RE.match(base) or base in (".", ".."):
        raise InvalidInput(f"{endpoint!r} is not an endpoint name", details={"field": "endpoint"})
    return endpoint


def is_log_file(info: pafs.FileInfo) -> bool:
    """A data file of the log: temporary files (``.name.tmp``) and markers (``_...``) are not."""
    name = info.base_name
    return info.type == pafs.FileType.File and name.endswith(".parquet") and not name.startswith((".", "_"))


def dedupe_sorted(table: pa.Table) -> pa.Table:
    """``table`` with one row per (request_id, instance, variant) (the first seen: a record
    written twice counts once; the shadow log has a row per shadow of a request), ordered by
    (timestamp, request_id, instance)."""
    if table.num_rows == 0:
        return table
    indexed = table.append_column("__row", pa.array(range(table.num_rows), type=pa.int64()))
    first = indexed.group_by(["request_id", "instance", "variant"], use_threads=False).aggregate([("__row", "min")])
    if first.num_rows != table.num_rows:
        table = table.take(first["__row_min"])
    return table.sort_by(SORT_KEYS)


@dataclass(frozen=True)
class _Erasure:
    request_ids: frozenset[str] | None
    caller: str | None
    until: float  # Unix seconds

    def mask(self, table: pa.Table) -> pa.Array:
        if self.request_ids is not None:
            return pc.fill_null(pc.is_in(table["request_id"], value_set=pa.array(sorted(self.request_ids))), False)
        return pc.fill_null(pc.equal(table["caller"], self.caller), False)

    def matches(self, record: PredictionRecord) -> bool:
        if self.request_ids is not None:
            return record.request_id in self.request_ids
        return record.caller == self.caller


class PredictionLogService:
    """Accumulates records, writes them as parquet, compacts, enforces retention, erases.

    Counters (received, written, dropped, last_write) live as long as this object, that is as
    long as the PredictionLog actor: a restart starts them from zero. ``files`` and ``bytes``
    in :meth:`stats` are read from the storage each time. Erasures are remembered for
    ``predlog.erase_remember_s`` by this object alone.

    Thread-safe: :meth:`write` only appends under a short lock, so it never waits behind a
    flush or a compaction running in another thread.
    """

    def __init__(self, settings: Settings, *, clock=time.time):
        self.settings = settings
        self._s = settings.predlog
        self._clock = clock
        self.root, self.fs = resolve_uri(self._s.root, settings)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        self._pending: list[PredictionRecord] = []
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time; erase holds it to see no flush in between
        self._maintenance_lock = threading.Lock()  # compaction, retention, erasure rewrite files one at a time
        self._erasures: dict[str, list[_Erasure]] = defaultdict(list)
        self._counts: dict[str, Counter] = defaultdict(Counter)
        self._last_write: dict[str, float] = {}

    # -- receiving -----------------------------------------------------------------------------
    def write(self, records: list[PredictionRecord], dropped: dict[str, int] | None = None) -> int:
        """Take a replica's shipment: ``records`` to write and the records it ``dropped`` since
        its last shipment ({endpoint: count}). Returns how many records were kept (the others
        match an erasure)."""
        now = self._clock()
        with self._pending_lock:
            for endpoint, count in (dropped or {}).items():
                self._counts[endpoint]["dropped"] += int(count)
            kept = []
            for rec in records:
                counts = self._counts[rec.endpoint]
                counts["received"] += 1
                if self._erased(rec, now):
                    counts["erased_on_arrival"] += 1
                    continue
                kept.append(rec)
            self._pending.extend(kept)
            over = len(self._pending) - self._s.actor_max_pending_records
            if over > 0:
                lost, self._pending = self._pending[:over], self._pending[over:]
                for endpoint, count in Counter(r.endpoint for r in lost).items():
                    self._counts[endpoint]["dropped"] += count
                    metrics.predlog_dropped(endpoint, count)
                log.warning("prediction log: %d records over actor_max_pending_records dropped", over)
            return len(kept)

    def _erased(self, rec: PredictionRecord, now: float) -> bool:
        erasures = self._erasures.get(rec.endpoint)
        if not erasures:
            return False
        live = [e for e in erasures if e.until > now]
        if len(live) != len(erasures):
            self._erasures[rec.endpoint] = live
        return any(e.matches(rec) for e in live)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- writing -------------------------------------------------------------------------------
    def flush(self) -> dict[str, int]:
        """Write every record received so far: one parquet file per (endpoint, hour). Records
        of a file that could not be written stay for the next flush, and the error is raised
        (DependencyUnavailable) after the others are written."""
        with self._flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, []
                now = self._clock()
                batch = [r for r in batch if not self._erased(r, now)]
            groups: dict[tuple[str, str], list[PredictionRecord]] = defaultdict(list)
            hours: dict[int, str] = {}
            for rec in batch:
                bucket = int(rec.timestamp // 3600)
                hour = hours.get(bucket)
                if hour is None:
                    hour = hours[bucket] = time.strftime(HOUR_FORMAT, time.gmtime(bucket * 3600))
                groups[(rec.endpoint, hour)].append(rec)
            failed: list[PredictionRecord] = []
            errors: list[str] = []
            written = files = 0
            for (endpoint, hour), recs in groups.items():
                try:
                    check_endpoint_name(endpoint)
                except InvalidInput:
                    log.error("prediction log: %d records of endpoint %r dropped (not an endpoint name)", len(recs), endpoint)
                    continue
                try:
                    table = to_table(recs)
                    self._write_file(partition_dir(self.root, endpoint, hour), table)
                except Exception as exc:
                    failed.extend(recs)
                    errors.append(f"{endpoint}/{hour}: {type(exc).__name__}: {exc}")
                    continue
                counts = self._counts[endpoint]
                counts["written"] += len(recs)
                counts["rows_written"] += table.num_rows
                self._last_write[endpoint] = self._clock()
                metrics.predlog_written(endpoint, len(recs))
                written += len(recs)
                files += 1
            if failed:
                with self._pending_lock:
                    self._pending[:0] = failed
                raise DependencyUnavailable(
                    f"the prediction log could not write {len(failed)} records to {self._s.root} (kept for the "
                    f"next try): {'; '.join(errors)[:500]}"
                )
            return {"records": written, "files": files}

    def _write_file(self, directory: str, table: pa.Table, name: str | None = None) -> str:
        """Write ``table`` as ``directory/name`` complete or not at all: a local file is written
        under a hidden name and renamed; an S3 object appears only when its upload completes."""
        name = name or f"{new_request_id(self._clock())}.parquet"
        final = f"{directory}/{name}"
        if self._local:
            self.fs.create_dir(directory, recursive=True)
            tmp = f"{directory}/.{name}.tmp"
            try:
                pq.write_table(table, tmp, filesystem=self.fs, compression=COMPRESSION)
                self.fs.move(tmp, final)
            except BaseException:
                try:
                    self.fs.delete_file(tmp)
                except OSError:
                    pass
                raise
        else:
            pq.write_table(table, final, filesystem=self.fs, compression=COMPRESSION)
        return final

    # -- listing -------------------------------------------------------------------------------
    def _list(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))

    def endpoints(self) -> list[str]:
        """The endpoints with a folder in the log."""
        prefix = f"{ENDPOINT_KEY}="
        return sorted(
            i.base_name[len(prefix):] for i in self._list(self.root)
            if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)
        )

    def hours(self, endpoint: str) -> list[str]:
        """The hour partitions of ``endpoint``, oldest first."""
        prefix = f"{HOUR_KEY}="
        out = []
        for i in self._list(endpoint_dir(self.root, check_endpoint_name(endpoint))):
            if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix):
                hour = i.base_name[len(prefix):]
                try:
                    parse_hour(hour)
                except ValueError:
                    continue
                out.append(hour)
        return sorted(out)

    def files(self, endpoint: str, hour: str) -> list[pafs.FileInfo]:
        return sorted((i for i in self._list(partition_dir(self.root, endpoint, hour)) if is_log_file(i)),
                      key=lambda i: i.path)

    # -- compaction ----------------------------------------------------------------------------
    def compact(self, endpoint: str | None = None, *, now: float | None = None) -> dict[str, int]:
        """Merge the small files of hour partitions into one: partitions holding at least
        ``compact_min_files`` files, and closed hours (ended more than CLOSED_AFTER_S ago) with
        more than one. The merged file is complete before any small file is deleted."""
        now = self._clock() if now is None else now
        merged = partitions = 0
        with self._maintenance_lock:
            for ep in [check_endpoint_name(endpoint)] if endpoint else self.endpoints():
                for hour in self.hours(ep):
                    files = self.files(ep, hour)
                    closed = parse_hour(hour).timestamp() + 3600 + CLOSED_AFTER_S <= now
                    if len(files) >= self._s.compact_min_files or (closed and len(files) > 1):
                        self._merge(partition_dir(self.root, ep, hour), files)
                        partitions += 1
                        merged += len(files)
        return {"partitions": partitions, "files_merged": merged}

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, filesystem=self.fs, columns=columns, schema=SCHEMA)

    def _merge(self, directory: str, files: list[pafs.FileInfo]) -> None:
        table = dedupe_sorted(pa.concat_tables([self._read(f.path) for f in files]))
        self._write_file(directory, table)
        for f in files:
            try:
                self.fs.delete_file(f.path)
            except FileNotFoundError:
                pass

    # -- retention -----------------------------------------------------------------------------
    def enforce_retention(
        self, days_by_endpoint: dict[str, int], default_days: int, *, now: float | None = None
    ) -> dict[str, int]:
        """Delete the hour partitions whose whole hour is older than the endpoint's retention
        (``days_by_endpoint``, else ``default_days``); returns partitions deleted per endpoint."""
        now = self._clock() if now is None else now
        out: dict[str, int] = {}
        with self._maintenance_lock:
            for ep in self.endpoints():
                try:
                    check_endpoint_name(ep)
                except InvalidInput:
                    continue
                cutoff = now - 86_400 * int(days_by_endpoint.get(ep) or default_days)
                hours = self.hours(ep)
                for hour in hours:
                    if parse_hour(hour).timestamp() + 3600 <= cutoff:
                        self.fs.delete_dir(partition_dir(self.root, ep, hour))
                        out[ep] = out.get(ep, 0) + 1
        return out

    # -- erasure -------------------------------------------------------------------------------
    def erase(
        self, endpoint: str, request_ids: list[str] | None = None, caller: str | None = None
    ) -> dict[str, int]:
        """Remove the records of ``request_ids`` or of ``caller`` from ``endpoint``'s log:
        each file holding any is rewritten without them (deleted when none is left), records
        not written yet are dropped, and those arriving within ``erase_remember_s`` (still in a
        replica's buffer now) are dropped on arrival."""
        check_endpoint_name(endpoint)
        if (request_ids is None) == (caller is None):
            raise InvalidInput("erase by request_ids or by caller (exactly one of them)", details={"field": "request_ids"})
        ids = frozenset(request_ids) if request_ids is not None else None
        erasure = _Erasure(ids, caller, self._clock() + self._s.erase_remember_s)
        with self._pending_lock:
            self._erasures[endpoint].append(erasure)
        removed = rewritten = 0
        with self._maintenance_lock, self._flush_lock:
            with self._pending_lock:
                before = len(self._pending)
                self._pending = [r for r in self._pending if not (r.endpoint == endpoint and erasure.matches(r))]
                pending_removed = before - len(self._pending)
            for hour in self._hours_to_search(endpoint, ids):
                directory = partition_dir(self.root, endpoint, hour)
                for f in self.files(endpoint, hour):
                    hit = erasure.mask(self._read(f.path, ["request_id", "caller"]))
                    count = pc.sum(hit).as_py() or 0
                    if not count:
                        continue
                    table = self._read(f.path)
                    keep = table.filter(pc.invert(erasure.mask(table)))
                    if keep.num_rows:
                        self._write_file(directory, keep, name=f.base_name)  # replaces it whole
                    else:
                        self.fs.delete_file(f.path)
                    removed += table.num_rows - keep.num_rows
                    rewritten += 1
        self._counts[endpoint]["erased"] += removed + pending_removed
        return {"records_removed": removed, "files_rewritten": rewritten, "pending_removed": pending_removed}

    def _hours_to_search(self, endpoint: str, ids: frozenset[str] | None) -> list[str]:
        hours = self.hours(endpoint)
        if ids is None:
            return hours
        wanted: set[str] = set()
        for rid in ids:
            issued = request_id_time(rid)
            if issued is None:  # not one of our ids: it could be anywhere
                return hours
            base = int(issued.timestamp() // 3600)
            # the record's timestamp is taken within moments of its id: the hour either side
            wanted.update(time.strftime(HOUR_FORMAT, time.gmtime(h * 3600)) for h in (base - 1, base, base + 1))
        return [h for h in hours if h in wanted]

    # -- stats ---------------------------------------------------------------------------------
    def stats(self, endpoint: str) -> dict[str, Any]:
        """What this actor saw of ``endpoint`` since it started (received, written, dropped as
        reported by the replicas, erased) and what the storage holds now (files, bytes, hours)."""
        check_endpoint_name(endpoint)
        counts = self._counts.get(endpoint, Counter())
        files = [i for i in self._list(endpoint_dir(self.root, endpoint), recursive=True) if is_log_file(i)]
        hours = self.hours(endpoint) if files else []
        last = self._last_write.get(endpoint)
        with self._pending_lock:
            pending = sum(1 for r in self._pending if r.endpoint == endpoint)
        return {
            "endpoint": endpoint,
            "received": counts["received"],
            "written": counts["written"],
            "rows_written": counts["rows_written"],
            "dropped": counts["dropped"],
            "erased": counts["erased"] + counts["erased_on_arrival"],
            "pending": pending,
            "files": len(files),
            "bytes": sum(i.size or 0 for i in files),
            "partitions": len(hours),
            "oldest_hour": hours[0] if hours else None,
            "newest_hour": hours[-1] if hours else None,
            "last_write": datetime.fromtimestamp(last, tz=timezone.utc).isoformat() if last else None,
        }


def retention_days(store, default_days: int) -> dict[str, int]:
    """{endpoint: days} from each endpoint's ``spec.logging.retention_days`` in the metadata
    store, ``default_days`` where it sets none."""
    out: dict[str, int] = {}
    token = None
    while True:
        rows, token = store.list_endpoints(limit=500, page_token=token)
        for row in rows:
            days = ((row.get("spec") or {}).get("logging") or {}).get("retention_days")
            ok = isinstance(days, int) and not isinstance(days, bool) and days > 0
            out[row["name"]] = days if ok else default_days
        if not token:
            return out
