from pathlib import Path

import pytest

from app.errors import ConfigError
from app.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("DATABASE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MATIH_HOME", "MATIH_PROFILE",
                 "MATIH_ADMIN_TOKEN", "S3_ENDPOINT", "REDIS_URL", "FEAST_REPO_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")  # the production profile's online features


def test_production_profile_needs_redis_for_online_features(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL")
    with pytest.raises(ConfigError, match="REDIS_URL"):
        load_settings("production", matih_home=str(tmp_path), admin_token="t0ken")
    s = load_settings("local", matih_home=str(tmp_path))
    assert s.features.online_store == "sqlite" and s.feast_repo_path == str(tmp_path.resolve() / "feature_repo")


def write_profile(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


def test_local_defaults_derive_paths_under_matih_home(tmp_path):
    s = load_settings("local", matih_home=str(tmp_path))
    assert s.profile == "local"
    assert s.database_url == f"sqlite:///{tmp_path / 'matih.db'}"
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert s.artifact_root == str(tmp_path / "artifacts")
    assert s.auth.enabled is True


def test_environment_names_override_the_profile(tmp_path, monkeypatch):
    cfg = write_profile(tmp_path, "local", "database_url: sqlite:////from/profile.db\nredis_url: redis://profile\n")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db:5432/matih_ml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("MATIH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REDIS_URL")
    s = load_settings("local", config_dir=cfg)
    assert s.database_url == "postgresql+psycopg://u:p@db:5432/matih_ml"
    assert s.mlflow_tracking_uri == "http://mlflow:5000"
    assert s.ray_address == "ray://head:10001"
    assert s.redis_url == "redis://profile"  # not in the environment: the profile's value stands
    assert s.matih_home == (tmp_path / "home").resolve()


def test_explicit_arguments_win_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://env")
    s = load_settings("local", matih_home=str(tmp_path), redis_url="redis://arg")
    assert s.redis_url == "redis://arg"


def test_unknown_key_names_the_key_and_the_fix(tmp_path):
    cfg = write_profile(tmp_path, "local", "databse_url: sqlite:///x.db\n")
    with pytest.raises(ConfigError) as err:
        load_settings("local", config_dir=cfg)
    assert "databse_url" in str(err.value)
    assert "unknown key" in str(err.value) and "database_url" in str(err.value)


def test_unknown_nested_key_is_refused(tmp_path):
    cfg = write_profile(tmp_path, "local", "serving:\n  max_models: 3\n")
    with pytest.raises(ConfigError, match=r"serving\.max_models: unknown key"):
        load_settings("local", config_dir=cfg)


def test_bad_value_names_the_key(tmp_path):
    cfg = write_profile(tmp_path, "local", "jobs:\n  max_concurrent: zero\n")
    with pytest.raises(ConfigError, match=r"jobs\.max_concurrent"):
        load_settings("local", config_dir=cfg)


def test_unknown_profile_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="local, production"):
        load_settings("staging", config_dir=tmp_path)


def test_production_profile_refuses_to_start_without_a_token(tmp_path):
    with pytest.raises(ConfigError, match="MATIH_ADMIN_TOKEN"):
        load_settings("production", matih_home=str(tmp_path))


def test_production_profile_with_token(tmp_path, monkeypatch):
    monkeypatch.setenv("MATIH_ADMIN_TOKEN", "s3cret-token")
    s = load_settings("production", matih_home=str(tmp_path))
    assert s.admin_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in str(s.public_dict())
    assert s.serving.autoscaling.min_replicas == 2


def test_settings_travel_to_other_processes_unchanged(tmp_path, monkeypatch):
    from app.settings import Settings

    monkeypatch.setenv("S3_SECRET_KEY", "k")
    s = load_settings("local", matih_home=str(tmp_path), admin_token="t")
    again = Settings(**s.to_init_kwargs())
    assert again == s
    assert again.s3_secret_key.get_secret_value() == "k"


def test_unknown_nested_key_suggests_the_section_keys(tmp_path):
    cfg = write_profile(tmp_path, "local", "jobs:\n  max_concurrency: 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings("local", config_dir=cfg)
    assert "max_concurrent" in str(err.value) and "database_url" not in str(err.value)


def test_only_documented_environment_names_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PROFILE", "staging")  # merely a field's name: ignored
    monkeypatch.setenv("HTTP", "not json")
    monkeypatch.setenv("MATIH_JOBS", '{"max_concurrent": 3}')
    s = load_settings("local", matih_home=str(tmp_path))
    assert s.profile == "local" and s.jobs.max_concurrent == 3


def test_bad_json_section_in_the_environment_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MATIH_SERVING", "{oops")
    with pytest.raises(ConfigError, match="MATIH_SERVING"):
        load_settings("local", matih_home=str(tmp_path))


def _with_credentials(tmp_path, monkeypatch):
    for name in ("DATABASE_URL", "MLFLOW_TRACKING_URI", "S3_ACCESS_KEY", "S3_SECRET_KEY", "MATIH_ADMIN_TOKEN", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    return load_settings(
        "production", matih_home=str(tmp_path), admin_token="adm-t0ken",
        database_url="postgresql://matih:db-pa55@db:5432/matih", mlflow_tracking_uri="https://ml:mlf-pa55@mlflow",
        redis_url="redis://:red-pa55@cache:6379/0", s3_endpoint="http://minio:9000",
        s3_access_key="AKIA-ID", s3_secret_key="s3-s3cret",
    )


SECRETS = ("adm-t0ken", "db-pa55", "mlf-pa55", "red-pa55", "AKIA-ID", "s3-s3cret")


def test_shared_settings_hold_no_credential(tmp_path, monkeypatch):
    import json

    s = _with_credentials(tmp_path, monkeypatch)
    shared = s.shared_kwargs()
    dumped = json.dumps(shared)
    assert not [x for x in SECRETS if x in dumped]
    assert shared["database_url"] == "postgresql+psycopg://matih@db:5432/matih"
    assert shared["mlflow_tracking_uri"] == "https://ml@mlflow" and shared["redis_url"] == "redis://cache:6379/0"
    assert shared["s3_endpoint"] == "http://minio:9000" and "s3_secret_key" not in shared


def test_each_process_gets_only_its_credentials(tmp_path, monkeypatch):
    s = _with_credentials(tmp_path, monkeypatch)
    assert s.credential_env("model_server") == {}
    assert s.credential_env("registry_cache") == {  # the store: trust records and the registry outbox
        "DATABASE_URL": "postgresql+psycopg://matih:db-pa55@db:5432/matih",
        "MLFLOW_TRACKING_URI": "https://ml:mlf-pa55@mlflow", "S3_ACCESS_KEY": "AKIA-ID", "S3_SECRET_KEY": "s3-s3cret"}
    job = s.credential_env("job")
    assert job["DATABASE_URL"] == "postgresql+psycopg://matih:db-pa55@db:5432/matih"
    assert "MATIH_ADMIN_TOKEN" not in job and "MATIH_ADMIN_TOKEN" not in s.credential_env("job_scheduler")
    assert s.credential_env("gateway")["MATIH_ADMIN_TOKEN"] == "adm-t0ken"


def test_a_process_rebuilds_its_settings_from_shared_ones_and_its_environment(tmp_path, monkeypatch):
    from app.settings import Settings

    s = _with_credentials(tmp_path, monkeypatch)
    # a job: what the JobScheduler answers, plus the env_vars it set for the job
    for name, value in s.credential_env("job").items():
        monkeypatch.setenv(name, value)
    job = Settings.from_shared(s.shared_kwargs())  # production profile, no admin token: no error
    assert job.admin_token is None
    assert job.redis_url == "redis://:red-pa55@cache:6379/0"  # materialization writes online features to Redis
    assert job.model_copy(update={"admin_token": s.admin_token, "redis_url": s.redis_url}) == s
    # without the environment, URLs stand without password and there are no keys
    for name in s.credential_env("job"):
        monkeypatch.delenv(name)
    bare = Settings.from_shared(s.shared_kwargs())
    assert bare.database_url == "postgresql+psycopg://matih@db:5432/matih" and not bare.s3_secret_key.get_secret_value()


def test_a_job_by_hand_needs_no_admin_token(tmp_path, monkeypatch):
    monkeypatch.delenv("MATIH_ADMIN_TOKEN", raising=False)
    s = load_settings("production", matih_home=str(tmp_path), need_admin_token=False)
    assert s.admin_token is None


def test_local_binds_this_machine_and_production_every_interface(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    from app.cli import serve_config_for

    repo_config = str(Path(__file__).resolve().parents[2] / "serve_config.yaml")
    with open(repo_config) as fh:
        assert yaml.safe_load(fh)["http_options"]["host"] == "127.0.0.1"  # `serve run serve_config.yaml` as is
    monkeypatch.delenv("MATIH_HTTP_PORT", raising=False)
    local = serve_config_for(load_settings("local", matih_home=str(tmp_path)), repo_config)
    assert local["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 60}
    monkeypatch.setenv("MATIH_ADMIN_TOKEN", "t")
    prod = serve_config_for(load_settings("production", matih_home=str(tmp_path), http_port=8080), repo_config)
    assert prod["http_options"] == {"host": "0.0.0.0", "port": 8080, "request_timeout_s": 60}
    assert prod["applications"] == local["applications"]


def test_serve_config_serves_the_v2_grpc_service_on_grpc_port(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml
    from ray.serve.config import gRPCOptions

    from app.api.v2_grpc import SERVICER_FUNCTION
    from app.cli import serve_config_for

    repo_config = str(Path(__file__).resolve().parents[2] / "serve_config.yaml")
    with open(repo_config) as fh:
        as_is = yaml.safe_load(fh)["grpc_options"]
    assert as_is["port"] == 9000 and as_is["grpc_servicer_functions"] == [SERVICER_FUNCTION]
    monkeypatch.delenv("MATIH_GRPC_PORT", raising=False)
    assert load_settings("local", matih_home=str(tmp_path)).grpc_port == 9000
    monkeypatch.setenv("MATIH_GRPC_PORT", "9100")
    config = serve_config_for(load_settings("local", matih_home=str(tmp_path)), repo_config)
    options = gRPCOptions(**config["grpc_options"])  # what Serve parses, importing the servicer function
    assert options.port == 9100 and options.request_timeout_s == 60
    assert options.grpc_servicer_functions == [SERVICER_FUNCTION] and len(options.grpc_servicer_func_callable) == 1
