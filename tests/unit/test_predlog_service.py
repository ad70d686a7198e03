"""The prediction log's writer and readers on a real local folder and a real S3-compatible
server: written records come back in order and page by page; compaction, retention and
erasure never lose or duplicate a record a reader sees."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from app.errors import InvalidInput
from app.predlog.ids import new_request_id
from app.predlog.layout import partition_dir
from app.predlog.query import log_exists, query
from app.predlog.records import PredictionRecord
from app.predlog.service import PredictionLogService, retention_days
from app.settings import load_settings

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc).timestamp()  # an hour boundary


def record(ts: float, endpoint: str = "iris", rows: int = 1, caller: str | None = "alice", variant: str = "") -> PredictionRecord:
    return PredictionRecord(
        new_request_id(ts), ts, endpoint, variant, "iris", "1", 1.0,
        inputs={"instances": [[ts, float(i)] for i in range(rows)]}, feature_names=["t", "i"],
        outputs={"predictions": list(range(rows))}, caller=caller,
    )


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def everything(settings, endpoint="iris", since=T0 - 86_400, until=T0 + 86_400, limit=1000, **kw):
    items, token = query(settings, endpoint, at(since), at(until), limit=limit, **kw)
    assert token is None
    return items


@pytest.fixture
def settings(tmp_path):
    return load_settings("local", matih_home=str(tmp_path), predlog={"compact_min_files": 3})


@pytest.fixture
def service(settings):
    return PredictionLogService(settings, clock=lambda: T0 + 3 * 3600)


def test_round_trip_in_order_with_pages_and_variant(settings, service):
    records = [record(T0 + 3590 + i * 5, rows=2, variant="b" if i % 2 else "a") for i in range(6)]  # spans 2 hours
    service.write(records[3:], {})
    service.write(records[:3], {"iris": 4})
    assert service.flush() == {"records": 6, "files": 2}
    items = everything(settings)
    assert len(items) == 12
    keys = [(i["timestamp"], i["request_id"], i["instance"]) for i in items]
    assert keys == sorted(keys)
    assert items[0]["inputs"] == {"t": T0 + 3590, "i": 0.0} and items[1]["prediction"] == 1
    pages, token = [], None
    while True:
        page, token = query(settings, "iris", at(T0), at(T0 + 7200), limit=5, page_token=token)
        pages.append(page)
        if token is None:
            break
    assert [len(p) for p in pages] == [5, 5, 2] and [i for p in pages for i in p] == items
    assert {i["variant"] for i in everything(settings, variant="b")} == {"b"}
    assert len(everything(settings, since=T0 + 3600)) == 8  # since is inclusive; hour 10 is not read
    stats = service.stats("iris")
    assert stats["received"] == 6 and stats["written"] == 6 and stats["rows_written"] == 12
    assert stats["dropped"] == 4 and stats["files"] == 2 and stats["bytes"] > 0 and stats["partitions"] == 2


def test_missing_folders_are_empty_and_bad_tokens_are_422(settings, service):
    assert everything(settings, endpoint="nothing") == []
    assert not log_exists(settings, "nothing")
    with pytest.raises(InvalidInput, match="page_token"):
        query(settings, "iris", at(T0), at(T0 + 60), page_token="garbage!")
    with pytest.raises(InvalidInput):
        query(settings, "../etc", at(T0), at(T0 + 60))


def test_compaction_merges_small_files_without_losing_or_duplicating(settings, service):
    for i in range(4):  # 4 files in hour 10 (>= compact_min_files), 2 in hour 11 (closed: the clock is 13:00)
        service.write([record(T0 + i * 60, rows=3)], {})
        service.flush()
    for i in range(2):
        service.write([record(T0 + 3600 + i * 60)], {})
        service.flush()
    before = everything(settings)
    # a reader between the merged file's write and the small files' delete sees both: de-duplicated
    directory = partition_dir(service.root, "iris", "2026-12-01T10")
    files = service.files("iris", "2026-12-01T10")
    service._write_file(directory, pq.read_table(files[0].path))
    assert everything(settings) == before
    result = service.compact()
    assert result == {"partitions": 2, "files_merged": 7}
    assert [len(service.files("iris", h)) for h in service.hours("iris")] == [1, 1]
    assert everything(settings) == before and len(before) == 14
    assert service.compact() == {"partitions": 0, "files_merged": 0}


def test_readers_running_through_compaction_never_miss_a_record(settings, service):
    for i in range(12):
        service.write([record(T0 + i)], {})
        service.flush()
    expected = everything(settings)
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(len(everything(settings)))

    thread = threading.Thread(target=reader)
    thread.start()
    service.compact()
    for i in range(12, 16):  # and a flush meanwhile
        service.write([record(T0 + i)], {})
        service.flush()
    service.compact()
    stop.set()
    thread.join()
    assert seen and all(n >= len(expected) for n in seen)
    assert len(everything(settings)) == 16


def test_retention_deletes_whole_hours_past_each_endpoints_days(settings, service):
    now = T0 + 10 * 86_400
    for endpoint in ("iris", "wine"):
        service.write([record(T0, endpoint), record(T0 + 7 * 86_400, endpoint), record(now - 60, endpoint)], {})
    service.flush()
    deleted = service.enforce_retention({"wine": 1}, default_days=5, now=now)
    assert deleted == {"iris": 1, "wine": 2}
    assert len(service.hours("iris")) == 2 and len(service.hours("wine")) == 1


def test_retention_days_come_from_each_endpoints_spec(settings):
    from app.store import MetadataStore

    store = MetadataStore(settings.database_url)
    store.migrate()
    store.create_endpoint("short", "iris@champion", "onnx", {}, "test", spec={"logging": {"retention_days": 2}})
    store.create_endpoint("plain", "iris@champion", "onnx", {}, "test")
    assert retention_days(store, 30) == {"plain": 30, "short": 2}


def test_erase_by_request_id_rewrites_files_and_drops_late_arrivals(settings, service):
    a, b, c = record(T0, rows=2), record(T0 + 1), record(T0 + 3700)
    service.write([a, b, c], {})
    service.flush()
    late = record(T0 + 2)
    pending = record(T0 + 3)
    service.write([pending], {})  # received, not written yet
    result = service.erase("iris", request_ids=[a.request_id, late.request_id, pending.request_id])
    assert result == {"records_removed": 2, "files_rewritten": 1, "pending_removed": 1}
    service.write([late], {})  # was still in a replica's buffer when the erasure ran
    service.flush()
    assert [i["request_id"] for i in everything(settings)] == [b.request_id, c.request_id]
    assert service.stats("iris")["erased"] == 4


def test_erase_by_caller_deletes_emptied_files(settings, service):
    mine = [record(T0 + i, caller="bob") for i in range(3)]
    service.write(mine + [record(T0 + 10, caller="alice")], {})
    service.flush()
    service.write([record(T0 + 3700, caller="bob")], {})
    service.flush()
    result = service.erase("iris", caller="bob")
    assert result["records_removed"] == 4 and result["files_rewritten"] == 2
    assert [i["caller"] for i in everything(settings)] == ["alice"]
    assert service.stats("iris")["files"] == 1
    service.write([record(T0 + 20, caller="bob")], {})
    service.flush()
    assert [i["caller"] for i in everything(settings)] == ["alice"]
    with pytest.raises(InvalidInput):
        service.erase("iris")
    with pytest.raises(InvalidInput):
        service.erase("iris", request_ids=["x"], caller="bob")


def test_failed_writes_keep_the_records(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    settings = load_settings("local", matih_home=str(tmp_path), predlog={"root": str(blocker)})
    service = PredictionLogService(settings)
    service.write([record(T0)], {})
    with pytest.raises(Exception):
        service.flush()
    assert service.pending == 1


def test_round_trip_on_s3(tmp_path, monkeypatch):
    from tests.s3server import start_s3_server

    s3 = start_s3_server()
    try:
        s3.create_bucket("predlog")
        settings = load_settings("local", matih_home=str(tmp_path), predlog={"root": "s3://predlog/log", "compact_min_files": 2},
                                 **s3.settings())
        service = PredictionLogService(settings, clock=lambda: T0 + 600)
        first, second = record(T0, rows=2), record(T0 + 5)
        service.write([first], {})
        service.flush()
        service.write([second], {})
        service.flush()
        assert len(everything(settings)) == 3 and log_exists(settings, "iris")
        assert service.compact()["partitions"] == 1
        assert len([k for k in s3.keys("predlog", "log/") if k.endswith(".parquet")]) == 1
        assert service.erase("iris", request_ids=[first.request_id])["records_removed"] == 2
        assert [i["request_id"] for i in everything(settings)] == [second.request_id]
        assert service.stats("iris")["files"] == 1
    finally:
        s3.stop()
