"""The metadata store on SQLite and on the real PostgreSQL (param 'postgres')."""

import pytest
from sqlalchemy import inspect

from app.errors import Conflict, InvalidInput, NotFound
from app.store import MetadataStore


def test_migrations_create_the_schema_and_are_idempotent(store):
    store.migrate()  # second run: nothing to do, nothing lost
    tables = set(inspect(store.engine).get_table_names())
    assert {"endpoints", "jobs", "audit_log", "api_tokens", "alembic_version"} <= tables


def test_endpoint_lifecycle_writes_audit_records(store):
    store.create_endpoint("iris", "iris@champion", "onnx", {}, "alice")
    with pytest.raises(Conflict):
        store.create_endpoint("iris", "iris/1", "onnx", {}, "bob")
    assert store.get_endpoint("iris")["target"] == "iris@champion"  # the duplicate changed nothing
    store.update_endpoint("iris", {"target": "iris/2"}, "bob")
    assert store.get_endpoint("iris")["target"] == "iris/2"
    store.delete_endpoint("iris", "carol")
    with pytest.raises(NotFound):
        store.get_endpoint("iris")
    records, _ = store.list_audit(resource_type="endpoint")
    assert [(r["action"], r["actor"]) for r in records] == [
        ("endpoint.delete", "carol"), ("endpoint.update", "bob"), ("endpoint.create", "alice")
    ]
    update = records[1]
    assert update["before"]["target"] == "iris@champion" and update["after"]["target"] == "iris/2"


def test_audit_records_keep_header_names_but_not_their_values(store):
    secret = {"headers": {"Authorization": "Bearer s3cr3t"}, "url": "http://triton:8000"}
    store.create_endpoint("remote", "iris@champion", "triton", secret, "alice")
    store.update_endpoint("remote", {"config": {**secret, "headers": {"Authorization": "Bearer n3w"}}}, "alice")
    store.delete_endpoint("remote", "alice")
    records, _ = store.list_audit(resource_type="endpoint")
    assert len(records) == 3
    assert "s3cr3t" not in repr(records) and "n3w" not in repr(records)
    create = records[2]["after"]["config"]
    assert create == {"headers": {"Authorization": "***"}, "url": "http://triton:8000"}


def test_listing_pages_with_tokens(store):
    for i in range(5):
        store.create_endpoint(f"ep{i}", "m@champion", "onnx", {}, "a")
    page1, tok = store.list_endpoints(limit=2)
    page2, tok2 = store.list_endpoints(limit=2, page_token=tok)
    page3, tok3 = store.list_endpoints(limit=2, page_token=tok2)
    assert [e["name"] for e in page1 + page2 + page3] == [f"ep{i}" for i in range(5)]
    assert tok3 is None
    with pytest.raises(InvalidInput):
        store.list_endpoints(page_token="not-a-token")


def test_jobs_queue_in_priority_order_and_move_only_legally(store):
    low = store.create_job("training", "low", {"x": 1}, "a", priority=0)
    high = store.create_job("training", "high", {"x": 2}, "a", priority=5)
    assert [j["name"] for j in store.queued_jobs()] == ["high", "low"]
    running = store.transition_job(high["job_id"], "running", expect="queued")
    assert running["attempts"] == 1 and running["started_at"]
    with pytest.raises(Conflict):  # a second scheduler cannot start it again
        store.transition_job(high["job_id"], "running", expect="queued")
    done = store.transition_job(high["job_id"], "succeeded", result={"model_version": "1"})
    assert done["result"] == {"model_version": "1"} and done["finished_at"]
    with pytest.raises(Conflict):
        store.transition_job(high["job_id"], "cancelled")
    store.update_job_progress(low["job_id"], {"stage": "x"}, "line one")
    store.update_job_progress(low["job_id"], {"epoch": 2}, "line two")
    job = store.get_job(low["job_id"], with_logs=True)
    assert job["progress"] == {"stage": "x", "epoch": 2}
    assert job["logs"] == "line one\nline two\n"


def test_create_job_is_idempotent_by_id(store):
    a = store.create_job("training", "j", {"v": 1}, "a", job_id="fixed-id")
    b = store.create_job("training", "j", {"v": 2}, "a", job_id="fixed-id")
    assert a["job_id"] == b["job_id"] == "fixed-id" and b["spec"] == {"v": 1}
    items, _ = store.list_jobs()
    assert len(items) == 1


def test_two_store_objects_share_the_database(store_url, store):
    other = MetadataStore(store.url)
    try:
        store.create_endpoint("shared", "m/1", "onnx", {}, "a")
        assert other.get_endpoint("shared")["target"] == "m/1"
    finally:
        other.dispose()


def test_unreachable_database_is_a_dependency_error():
    from app.errors import DependencyUnavailable

    bad = MetadataStore("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(DependencyUnavailable, match="metadata store unreachable"):
        bad.ping()


@pytest.mark.postgres
def test_postgres_connections_have_connect_and_statement_timeouts(tmp_path):
    """settings.database bounds every PostgreSQL call: a statement past statement_timeout is
    cancelled by the server (503 dependency_unavailable through the store), and a server that
    does not answer fails the connect within connect_timeout."""
    import time

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from app.errors import DependencyUnavailable
    from app.settings import load_settings
    from tests.conftest import POSTGRES_URL, _postgres_admin_engine

    try:
        _postgres_admin_engine().connect().close()
    except OperationalError:
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}")
    settings = load_settings(database_url=POSTGRES_URL, matih_home=str(tmp_path),
                             database={"connect_timeout_s": 1, "statement_timeout_s": 0.3})
    store = MetadataStore.from_settings(settings)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar() == "300ms"
            with pytest.raises(OperationalError, match="statement timeout"):
                conn.execute(text("SELECT pg_sleep(2)"))
        with pytest.raises(DependencyUnavailable), store._tx() as s:
            s.execute(text("SELECT pg_sleep(2)"))
    finally:
        store.dispose()
    # 10.255.255.1 is not routed: without connect_timeout the connect would wait for the OS (minutes)
    silent = MetadataStore("postgresql+psycopg://u@10.255.255.1:5432/x", connect_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(DependencyUnavailable):
        silent.ping()
    assert time.monotonic() - started < 5
