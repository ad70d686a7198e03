"""Shared fixtures: metadata stores on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import pytest

POSTGRES_URL = os.environ.get("MATIH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_LEAKY_ENV = ("MLFLOW_", "AWS_")


@pytest.fixture(autouse=True, scope="module")
def _restore_mlflow_and_s3_env():
    """``mlflow.set_tracking_uri`` (called by ModelRegistry and training) and
    ``configure_s3_env`` export MLFLOW_* / AWS_* variables, and ``load_settings`` reads
    MLFLOW_TRACKING_URI: without this, one module's MLflow or S3 server leaks into the next."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(_LEAKY_ENV)}
    yield
    for key in [k for k in os.environ if k.startswith(_LEAKY_ENV)]:
        del os.environ[key]
    os.environ.update(saved)


def _postgres_admin_engine():
    from sqlalchemy import create_engine

    url = POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


@contextmanager
def postgres_database():
    """A new, empty PostgreSQL database (its URL), dropped afterwards. Without a reachable
    server the test is skipped, or fails under MATIH_REQUIRE_POSTGRES (CI)."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    admin = _postgres_admin_engine()
    name = f"matih_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        if os.environ.get("MATIH_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is required (MATIH_REQUIRE_POSTGRES=1) but unreachable: {exc}")
        pytest.skip(
            f"no PostgreSQL at {POSTGRES_URL}: start one (trust auth) or set MATIH_TEST_POSTGRES_URL to enable these"
        )
    base = POSTGRES_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    """A fresh, empty database URL: a SQLite file, or a new PostgreSQL database dropped after."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def store(store_url):
    from app.settings import load_settings
    from app.store import MetadataStore

    # Through the settings, so postgresql:// URLs get the psycopg driver as in production.
    url = load_settings(database_url=store_url, matih_home="/tmp/unused-matih-home").database_url
    s = MetadataStore(url)
    s.migrate()
    yield s
    s.dispose()
