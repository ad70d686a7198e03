"""The production profile's managed Feast repo, for real: the SQL registry in the `feast` schema
of a PostgreSQL database, online features in Redis. Definitions applied through
``FeatureDefinitions`` (what the API runs) are a normal Feast repo: the Feast CLI
(``feast -c <repo> feature-views list``) and a fresh ``feast.FeatureStore(repo_path=...)`` see
them, and a materialized view is read back from Redis with ``get_online_features``."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from app.features.definitions import FeatureDefinitions
from app.features.repo import open_store
from app.features.specs import EntityDef, ServiceDef, SourceDef, ViewDef
from app.settings import load_settings
from tests.unit.test_features_definitions import write_driver_stats

pytestmark = pytest.mark.postgres
REDIS_URL = os.environ.get("MATIH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def feast_cli(repo: str, *args: str) -> str:
    """The Feast CLI of this interpreter's environment, as an operator runs it."""
    exe = Path(sys.executable).parent / "feast"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "feast.cli.cli"]
    out = subprocess.run([*cmd, "-c", repo, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        if os.environ.get("MATIH_REQUIRE_POSTGRES"):
            pytest.fail(f"Redis at {REDIS_URL} is required but unreachable")
        pytest.skip(f"no Redis at {REDIS_URL}")
    finally:
        client.close()
    return REDIS_URL


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_production_profile_is_a_normal_feast_repo(store_url, redis_url, tmp_path):
    project = f"t_{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        "local", matih_home=str(tmp_path), database_url=store_url, redis_url=redis_url, need_admin_token=False,
        features={"project": project, "online_store": "redis", "engine": "local"},
    )
    defs = FeatureDefinitions(settings)
    data = Path(settings.storage.data_roots[0])
    write_driver_stats(data / "drivers.parquet")

    defs.apply_entity(EntityDef(name="driver", join_keys=["driver_id"]))
    defs.apply_source(SourceDef(name="driver_stats", path="drivers.parquet", timestamp_field="event_ts"))
    view, before = defs.apply_view(ViewDef.model_validate({
        "name": "driver_hourly", "entities": ["driver"], "source": "driver_stats", "ttl_s": 0,
        "schema": [{"name": "conv_rate", "dtype": "Float64"}, {"name": "trips", "dtype": "Int64"}]}))
    assert before is None and view["schema"][1] == {"name": "trips", "dtype": "Int64"}
    defs.apply_service(ServiceDef(name="driver_model", features=["driver_hourly:conv_rate"]))

    repo = settings.feast_repo_path
    yaml_text = (Path(repo) / "feature_store.yaml").read_text()
    assert "type: redis" in yaml_text and "search_path" in yaml_text  # the production profile, really
    assert "driver_hourly" in feast_cli(repo, "feature-views", "list")
    entities = feast_cli(repo, "entities", "list")
    assert "driver" in entities and "INT64" in entities  # typed from the view's join key column
    assert "driver_model" in feast_cli(repo, "feature-services", "list")

    from feast import FeatureStore

    sdk = FeatureStore(repo_path=repo)
    assert sdk.project == project
    assert [v.name for v in sdk.list_feature_views()] == ["driver_hourly"]
    assert sdk.get_entity("driver").join_key == "driver_id"

    # materialize into Redis and read it back online
    store = open_store(settings)
    store.materialize(datetime(2025, 12, 1, tzinfo=timezone.utc), datetime(2026, 2, 1, tzinfo=timezone.utc))
    online = sdk.get_online_features(features=sdk.get_feature_service("driver_model"),
                                     entity_rows=[{"driver_id": 1}, {"driver_id": 2}]).to_dict()
    assert online["conv_rate"] == [0.3, 0.2]  # driver 1: its latest row

    # clean up this project's online keys (Feast's teardown of the view) and registry rows
    defs.delete_service("driver_model")
    defs.delete_view("driver_hourly")
    assert "driver_hourly" not in feast_cli(repo, "feature-views", "list")
