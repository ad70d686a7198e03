"""Registrations racing on PostgreSQL: the metadata store and MLflow's backend store both on
a real PostgreSQL (a fresh database each), 50 threads registering versions of one model at
once through the registration path. Every one gets its own version and its audit record."""

from __future__ import annotations

import threading
import uuid

import pytest

from tests.conftest import POSTGRES_URL, _postgres_admin_engine
from tests.unit.test_registry_api import onnx_bytes

pytestmark = pytest.mark.postgres

PARALLEL = 50


@pytest.fixture
def mlflow_postgres_url():
    """A fresh PostgreSQL database for MLflow's backend store, dropped after."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    admin = _postgres_admin_engine()
    name = f"matih_mlflow_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {exc}")
    yield POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    with admin.connect() as conn:
        conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_parallel_registrations_get_distinct_versions_and_one_audit_record_each(store, mlflow_postgres_url, tmp_path):
    from app.registry.mlflow_registry import ModelRegistry, ensure_experiment
    from app.registry.service import RegistryService
    from app.settings import load_settings

    settings = load_settings("local", matih_home=str(tmp_path / "home"), database_url=store.url,
                             mlflow_tracking_uri=mlflow_postgres_url)
    settings.matih_home.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(settings)
    ensure_experiment(registry.client, settings)  # what bootstrap.prepare does once
    svc = RegistryService(settings, registry, store)
    data = onnx_bytes()
    start = threading.Barrier(PARALLEL)
    views, errors = [], []

    def register(i: int) -> None:
        start.wait()
        try:
            views.append(svc.register_upload("par", "onnx", data, f"dev{i}"))
        except Exception as exc:  # collected: the assertion below names them
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=register, args=(i,)) for i in range(PARALLEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    versions = sorted(int(v["version"]) for v in views)
    assert versions == list(range(1, PARALLEL + 1))
    in_mlflow = registry.client.search_model_versions("name = 'par'", max_results=1000)
    assert sorted(int(mv.version) for mv in in_mlflow) == versions
    assert {mv.tags["matih.registered_by"] for mv in in_mlflow} == {f"dev{i}" for i in range(PARALLEL)}
    audits = [a for a in store.list_audit(limit=1000, resource_type="model_version")[0]
              if a["action"] == "model_version.create"]
    assert sorted(a["resource_id"] for a in audits) == sorted(f"par/{v}" for v in versions)
    assert store.pending_ops() == []
