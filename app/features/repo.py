"""The managed Feast repo: ``FEAST_REPO_PATH/feature_store.yaml``, rendered from the template
``configs/feast/feature_store.yaml`` and the profile's ``features`` section at every start, so
the platform and the Feast CLI (``feast -c $FEAST_REPO_PATH feature-views list``) open the same
registry and stores.

Local profile: SQL registry on a SQLite file, SQLite online store, parquet (file) offline store.
Production: SQL registry in its own schema of the metadata store's PostgreSQL database, Redis
online store (``REDIS_URL``), Feast's Ray compute engine against ``RAY_ADDRESS``.
"""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import yaml

from app.errors import ConfigError, DependencyUnavailable
from app.settings import CONFIG_DIR, Settings

TEMPLATE = CONFIG_DIR / "feast" / "feature_store.yaml"
YAML_NAME = "feature_store.yaml"
_HEADER = (
    "# Rendered by MATIH ML (app/features/repo.py) from configs/feast/feature_store.yaml and the profile's\n"
    "# `features` section at every start: change those, not this file. The Feast CLI reads it as is:\n"
    "#   feast -c {path} feature-views list\n"
)

_lock = threading.Lock()
_stores: dict[tuple[str, str], Any] = {}


def registry_url(settings: Settings) -> str:
    """Feast's SQL registry: ``features.registry``, else beside the metadata store (a SQLite
    file in the repo, or the ``features.registry_schema`` schema of the same PostgreSQL database)."""
    f = settings.features
    if f.registry:
        return f.registry
    db = settings.database_url
    if db.startswith("postgresql"):
        sep = "&" if "?" in db else "?"
        return f"{db}{sep}options={quote(f'-csearch_path={f.registry_schema}')}"
    return f"sqlite:///{Path(settings.feast_repo_path) / 'registry.db'}"


def redis_connection_string(redis_url: str) -> str:
    """REDIS_URL (``redis://[:password@]host:port/db``, ``rediss://`` for TLS) as Feast's
    ``host:port,db=N,password=...,ssl=true``."""
    parts = urlsplit(redis_url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(f"REDIS_URL must look like redis://host:port/db, not {redis_url!r}")
    out = [f"{parts.hostname}:{parts.port or 6379}"]
    db = parts.path.strip("/")
    if db:
        out.append(f"db={int(db)}")
    if parts.username and parts.username != "default":
        out.append(f"username={unquote(parts.username)}")
    if parts.password:
        out.append(f"password={unquote(parts.password)}")
    if parts.scheme == "rediss":
        out.append("ssl=true")
    return ",".join(out)


def repo_config(settings: Settings) -> dict[str, Any]:
    """The ``feature_store.yaml`` of ``settings``: the template with the keys the profile sets."""
    f = settings.features
    repo = Path(settings.feast_repo_path)
    config = copy.deepcopy(yaml.safe_load(TEMPLATE.read_text()))
    config["project"] = f.project
    config["registry"].update(path=registry_url(settings), cache_ttl_seconds=f.registry_cache_ttl_s)
    if f.online_store == "redis":
        config["online_store"] = {"type": "redis", "connection_string": redis_connection_string(settings.redis_url)}
    else:
        config["online_store"] = {"type": "sqlite", "path": str(repo / "online.db")}
    if f.offline_store == "ray":
        config["offline_store"] = {"type": "ray", "storage_path": str(repo / "offline"),
                                   **({"ray_address": settings.ray_address} if settings.ray_address else {})}
    else:
        config["offline_store"] = {"type": "file"}
    if f.engine == "ray":
        writers = f.engine_write_concurrency or (4 if f.online_store == "redis" else 1)
        engine: dict[str, Any] = {"type": "ray.engine", "write_concurrency": writers}
        if f.engine_max_workers:
            engine["max_workers"] = f.engine_max_workers
        if settings.ray_address:
            engine["ray_address"] = settings.ray_address
        config["batch_engine"] = engine
    else:
        config["batch_engine"] = {"type": "local"}
    return config


def _ensure_schema(url: str, schema: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    base = url.split("?options=", 1)[0].split("&options=", 1)[0]
    engine = create_engine(base, connect_args={"connect_timeout": 10})
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    except OperationalError as exc:
        raise DependencyUnavailable(f"cannot create the Feast registry schema {schema!r}: {exc}") from exc
    finally:
        engine.dispose()


def ensure_repo(settings: Settings) -> Path:
    """Create or refresh the repo: the folder, the registry's PostgreSQL schema, and
    ``feature_store.yaml`` (mode 0600: it may hold the Redis password). Returns the repo path."""
    repo = Path(settings.feast_repo_path)
    repo.mkdir(parents=True, exist_ok=True)
    if not settings.features.registry and settings.database_url.startswith("postgresql"):
        _ensure_schema(settings.database_url, settings.features.registry_schema)
    text = _HEADER.format(path=repo) + yaml.safe_dump(repo_config(settings), sort_keys=False)
    path = repo / YAML_NAME
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    return repo


def open_store(settings: Settings, fresh: bool = False):
    """The process's ``feast.FeatureStore`` for ``settings`` (one per repo and config; the
    repo is rendered on first use). ``fresh``: a new one, not the shared one."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    config = repo_config(settings)
    key = (settings.feast_repo_path, yaml.safe_dump(config, sort_keys=True))
    with _lock:
        store = None if fresh else _stores.get(key)
        if store is None:
            repo = ensure_repo(settings)
            store = FeatureStore(config=RepoConfig(repo_path=repo, **config))
            if not fresh:
                _stores[key] = store
    return store


# A push source's stream declaration lives in the Feast registry, as tags of the PushSource
# (written by app/features/definitions.py, read by the StreamIngestor): the broker kind
# ("kafka" | "redis") and the Kafka topic or Redis stream key.
STREAM_KIND_TAG = "matih.stream.kind"
STREAM_TOPIC_TAG = "matih.stream.topic"
