"""The managed Feast repo's feature_store.yaml: what each profile renders, and that Feast itself
loads the rendered file (the CLI reads the same one)."""

from __future__ import annotations

import stat

import pytest
import yaml

from app.errors import ConfigError
from app.features.repo import ensure_repo, redis_connection_string, registry_url, repo_config
from app.settings import load_settings


@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6379/0", "127.0.0.1:6379,db=0"),
    ("redis://cache", "cache:6379"),
    ("rediss://:s%40cret@cache:6380/2", "cache:6380,db=2,password=s@cret,ssl=true"),
    ("redis://ml:pw@cache:6379/1", "cache:6379,db=1,username=ml,password=pw"),
])
def test_redis_url_becomes_feast_connection_string(url, expected):
    assert redis_connection_string(url) == expected


def test_a_redis_url_without_host_is_a_config_error():
    with pytest.raises(ConfigError, match="REDIS_URL"):
        redis_connection_string("localhost:6379")


def test_local_profile_renders_sqlite_registry_and_online_store(tmp_path):
    s = load_settings("local", matih_home=str(tmp_path))
    repo = ensure_repo(s)
    path = repo / "feature_store.yaml"
    assert repo == tmp_path.resolve() / "feature_repo"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it may carry the Redis password
    config = yaml.safe_load(path.read_text())
    assert config["registry"]["registry_type"] == "sql"
    assert config["registry"]["path"] == f"sqlite:///{repo / 'registry.db'}"
    assert config["online_store"] == {"type": "sqlite", "path": str(repo / "online.db")}
    assert config["offline_store"] == {"type": "file"}
    assert config["batch_engine"] == {"type": "ray.engine", "write_concurrency": 1}
    from feast.repo_config import load_repo_config

    loaded = load_repo_config(repo, path)  # what `feast -c repo ...` does
    assert loaded.project == "matih" and loaded.online_store.type == "sqlite"


def test_production_settings_put_the_registry_in_its_own_schema_and_features_on_redis(tmp_path):
    s = load_settings("local", matih_home=str(tmp_path), database_url="postgresql://u@db:5432/matih",
                      redis_url="redis://cache:6379/3", ray_address="ray://head:10001",
                      features={"online_store": "redis", "offline_store": "ray", "project": "churn"})
    assert registry_url(s) == "postgresql+psycopg://u@db:5432/matih?options=-csearch_path%3Dfeast"
    config = repo_config(s)
    assert config["project"] == "churn"
    assert config["online_store"] == {"type": "redis", "connection_string": "cache:6379,db=3"}
    assert config["batch_engine"]["ray_address"] == "ray://head:10001"
    assert config["batch_engine"]["write_concurrency"] == 4
    assert config["offline_store"]["type"] == "ray"


def test_the_file_is_rewritten_only_when_the_settings_change(tmp_path):
    s = load_settings("local", matih_home=str(tmp_path))
    path = ensure_repo(s) / "feature_store.yaml"
    before = path.stat().st_mtime_ns
    ensure_repo(s)
    assert path.stat().st_mtime_ns == before
    ensure_repo(load_settings("local", matih_home=str(tmp_path), features={"project": "other"}))
    assert yaml.safe_load(path.read_text())["project"] == "other"
