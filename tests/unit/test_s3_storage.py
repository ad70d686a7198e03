"""S3 artifacts against a real S3-compatible server (moto in server mode, over HTTP):
training logs the ONNX model into the bucket, the registry downloads it back, pyarrow reads
and writes through the platform's filesystem. No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.bootstrap import prepare
from app.errors import ConfigError, InvalidInput
from app.registry.mlflow_registry import ModelRegistry
from app.schemas import TrainingJobSpec
from app.settings import load_settings
from app.storage.s3 import configure_s3_env, resolve_uri, s3_filesystem
from app.training.pipeline import train_sklearn
from tests.s3server import start_s3_server

_ENV = (
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


@pytest.fixture(scope="module")
def s3():
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """configure_s3_env writes os.environ; monkeypatch puts every key back afterwards."""
    for key in _ENV + ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # mlflow.set_tracking_uri exports these
        monkeypatch.delenv(key, raising=False)


def _settings(tmp_path, s3, bucket: str):
    return load_settings(
        "local",
        matih_home=str(tmp_path),
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_root=f"s3://{bucket}/mlflow",
        auth={"enabled": False},
        **s3.settings(),
    )


def test_configure_exports_settings_for_mlflow_and_boto3(tmp_path, s3):
    settings = _settings(tmp_path, s3, "unused")
    configure_s3_env(settings)
    import os

    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == s3.endpoint
    assert os.environ["AWS_ACCESS_KEY_ID"] == settings.s3_access_key.get_secret_value()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == settings.s3_secret_key.get_secret_value()
    assert os.environ["AWS_DEFAULT_REGION"]


def test_no_s3_settings_leave_the_environment_alone(tmp_path):
    import os

    configure_s3_env(load_settings("local", matih_home=str(tmp_path)))
    assert not any(key in os.environ for key in _ENV)


def test_bad_endpoint_is_a_config_error(tmp_path):
    settings = load_settings("local", matih_home=str(tmp_path), s3_endpoint="ftp://minio:9000")
    with pytest.raises(ConfigError, match="S3_ENDPOINT"):
        configure_s3_env(settings)


def test_resolve_uri(tmp_path):
    settings = load_settings("local", matih_home=str(tmp_path), s3_endpoint="http://127.0.0.1:9")
    path, fs = resolve_uri("s3://bucket/a/b.parquet", settings)
    assert (path, fs.type_name) == ("bucket/a/b.parquet", "s3")
    path, fs = resolve_uri(f"file://{tmp_path}/x.csv", settings)
    assert (path, fs.type_name) == (f"{tmp_path}/x.csv", "local")
    with pytest.raises(InvalidInput, match="gs://"):
        resolve_uri("gs://bucket/x", settings)
    with pytest.raises(InvalidInput, match="bucket"):
        resolve_uri("s3://", settings)


def test_pyarrow_filesystem_reads_and_writes_the_bucket(tmp_path, s3):
    settings = _settings(tmp_path, s3, s3.create_bucket("matih-pyarrow"))
    fs = s3_filesystem(settings)
    table = pa.table({"x": np.arange(1000, dtype=np.float32)})
    pq.write_table(table, "matih-pyarrow/data/part-0.parquet", filesystem=fs)
    assert s3.keys("matih-pyarrow") == ["data/part-0.parquet"]
    assert pq.read_table("matih-pyarrow/data", filesystem=fs).equals(table)


def test_training_logs_the_onnx_model_to_s3_and_the_registry_downloads_it(tmp_path, s3):
    import onnxruntime as ort

    bucket = s3.create_bucket("matih-artifacts")
    settings = _settings(tmp_path, s3, bucket)
    prepare(settings)
    spec = TrainingJobSpec.model_validate(
        {
            "name": "iris-s3",
            "estimator": "sklearn.linear_model.LogisticRegression",
            "hyperparameters": {"max_iter": 300},
            "dataset": {"uri": "builtin://iris", "target": "target"},
            "register_as": "iris_s3",
        }
    )
    result = train_sklearn(spec, settings, "job-s3-1", lambda progress, line=None: None)
    assert result["model_version"] == "1"

    keys = s3.keys(bucket, "mlflow/")
    onnx_keys = [k for k in keys if k.endswith(".onnx")]
    assert onnx_keys, keys
    assert all(k.startswith(f"mlflow/{settings.experiment_name}/") for k in keys)
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*.onnx"))

    registry = ModelRegistry(settings)
    model = registry.resolve("iris_s3@champion")
    local = registry.download(model)
    files = list(local.rglob("*.onnx"))
    assert files and str(local).startswith(str(tmp_path / "model_cache"))
    sess = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)})
    assert int(np.asarray(out[0]).reshape(-1)[0]) == 0


def test_training_datasets_read_from_s3(tmp_path, s3):
    from app.datasets import load_dataset
    from app.errors import NotFound

    settings = _settings(tmp_path, s3, s3.create_bucket("matih-data"))
    frame = load_dataset("builtin://iris")
    fs = s3_filesystem(settings)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), "matih-data/iris.parquet", filesystem=fs)
    with fs.open_output_stream("matih-data/iris.csv") as out:
        out.write(frame.to_csv(index=False).encode())
    for name in ("iris.parquet", "iris.csv"):
        got = load_dataset(f"s3://matih-data/{name}", settings)
        assert got.shape == frame.shape and list(got.columns) == list(frame.columns)
    with pytest.raises(NotFound, match="does not exist"):
        load_dataset("s3://matih-data/nope.parquet", settings)
