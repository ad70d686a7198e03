"""Batch prediction over HTTP on the session's Ray cluster: Ray Data reads, an actor pool of
ONNX Runtime predictors, writes; local files, CSV, bad requests, and S3 on a real
S3-compatible server (moto in server mode, named by the platform's S3 settings)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "row_key": rng.permutation(n).astype(np.int64) * 7 + 3,  # not sorted: order must come from the job
            "sepal_length": rng.uniform(4.0, 8.0, n),
            "sepal_width": rng.uniform(2.0, 4.5, n),
            "petal_length": rng.uniform(1.0, 7.0, n),
            "petal_width": rng.uniform(0.1, 2.5, n),
            "note": rng.choice(["a", "b", "c"], n),
        }
    )


@pytest.fixture
def data_dir(platform, request):
    """A fresh folder under the platform's default data root (MATIH_HOME/data): job specs may
    name only paths inside settings.storage.data_roots."""
    folder = platform.home / "data" / f"batch-{request.node.name.replace('[', '-').replace(']', '')}"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def onnx_session(platform, iris):
    """The champion's ONNX model, opened directly with ONNX Runtime (the reference)."""
    import onnxruntime as ort

    from app.registry.mlflow_registry import ModelRegistry

    registry = ModelRegistry(platform.settings)
    path = next(registry.download(registry.resolve("iris@champion")).rglob("*.onnx"))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _reference(session, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    X = frame[FEATURES].to_numpy(dtype=np.float32)
    labels, proba = session.run(None, {session.get_inputs()[0].name: X})
    return np.asarray(labels).reshape(-1), np.asarray(proba)


def _submit(platform, body: dict) -> dict:
    with platform.client() as c:
        r = c.post("/v1/batch/jobs", json=body)
        assert r.status_code == 202, r.text
        job = platform.wait_job(r.json()["job_id"], timeout=400)
    assert job["status"] == "succeeded", (job.get("error"), job.get("logs"))
    return job


def _read_in_name_order(folder, fmt: str = "parquet") -> pd.DataFrame:
    files = sorted(p for p in folder.iterdir() if p.name.startswith("part-"))
    assert files, list(folder.iterdir())
    read = pd.read_parquet if fmt == "parquet" else pd.read_csv
    return pd.concat([read(p) for p in files], ignore_index=True)


def test_parquet_batch_of_100k_rows(platform, iris, onnx_session, data_dir):
    n = 100_000
    frame = _frame(n)
    src = data_dir / "scoring.parquet"
    frame.to_parquet(src, row_group_size=30_000)
    out = data_dir / "predictions"
    job = _submit(
        platform,
        {
            "model": "iris@champion",
            "input_uri": str(src),
            "output_uri": str(out),
            "format": "parquet",
            "key_column": "row_key",
            "passthrough_columns": ["note"],
            "return_probabilities": True,
            "batch_size": 4096,
        },
    )
    assert job["kind"] == "batch_prediction"
    assert job["progress"]["rows_done"] == job["progress"]["rows_total"] == n
    assert job["result"]["rows"] == n and job["result"]["model_version"] == "1"

    result = _read_in_name_order(out)
    assert len(result) == n
    assert list(result.columns) == ["row_key", "note", "prediction", "probabilities"]
    # Exactly one row per input row, in input order (files read in name order) ...
    assert np.array_equal(result["row_key"].to_numpy(), frame["row_key"].to_numpy())
    assert (result["note"] == frame["note"]).all()
    # ... and a reader of the whole folder sees the same order.
    assert np.array_equal(pq.read_table(out).column("row_key").to_numpy(), frame["row_key"].to_numpy())

    sample = np.random.default_rng(1).choice(n, 2_000, replace=False)
    labels, proba = _reference(onnx_session, frame.iloc[sample])
    assert np.array_equal(result["prediction"].to_numpy()[sample], labels)
    got_proba = np.stack(result["probabilities"].to_numpy()[sample])
    assert np.allclose(got_proba, proba, atol=1e-6)

    with platform.client() as c:
        batch_view = c.get(f"/v1/batch/jobs/{job['job_id']}")
        assert batch_view.status_code == 200 and batch_view.json()["progress"]["rows_done"] == n
        listed = c.get("/v1/batch/jobs").json()["items"]
        assert job["job_id"] in [j["job_id"] for j in listed]
        assert c.get(f"/v1/training/jobs/{job['job_id']}").status_code == 404
        assert c.get(f"/v1/batch/jobs/{iris['job_id']}").status_code == 404  # a training job


def test_csv_in_csv_out(platform, iris, onnx_session, data_dir):
    n = 5_000
    frame = _frame(n, seed=2)
    src = data_dir / "scoring.csv"
    frame.to_csv(src, index=False)
    out = data_dir / "csv-predictions"
    job = _submit(
        platform,
        {
            "model": "iris/1",
            "input_uri": f"file://{src}",
            "output_uri": str(out),
            "format": "csv",
            "key_column": "row_key",
            "return_probabilities": True,
            "concurrency": 1,
        },
    )
    assert job["progress"]["rows_done"] == job["progress"]["rows_total"] == n
    result = _read_in_name_order(out, "csv")
    assert len(result) == n
    assert list(result.columns) == ["row_key", "prediction", "probability_0", "probability_1", "probability_2"]
    assert np.array_equal(result["row_key"].to_numpy(), frame["row_key"].to_numpy())
    labels, proba = _reference(onnx_session, frame)
    assert np.array_equal(result["prediction"].to_numpy(), labels)
    assert np.allclose(result[["probability_0", "probability_1", "probability_2"]].to_numpy(), proba, atol=1e-5)


def test_bad_requests_are_refused_at_submit(platform, iris, data_dir):
    src = data_dir / "ok.parquet"
    _frame(100).to_parquet(src)
    used = data_dir / "used"
    used.mkdir()
    (used / "other.parquet").write_bytes(b"x")
    base = {"model": "iris@champion", "input_uri": str(src), "output_uri": str(data_dir / "out")}
    cases = [
        ({"model": "no_such_model@champion"}, 404, "not_found"),
        ({"model": "iris/99"}, 404, "not_found"),
        ({"format": "xlsx"}, 422, "invalid_input"),
        ({"input_uri": str(data_dir / "missing.parquet")}, 404, "not_found"),
        ({"input_uri": str(data_dir / "data.bin")}, 422, "invalid_input"),
        ({"output_uri": str(used)}, 409, "conflict"),
        ({"output_uri": str(src)}, 422, "invalid_input"),
        ({"feature_columns": ["a", "b", "c", "d"]}, 422, "invalid_input"),
        ({"key_column": "nope"}, 422, "invalid_input"),
        ({"passthrough_columns": ["prediction"]}, 422, "invalid_input"),
        ({"batch_size": 0}, 422, "invalid_input"),
        ({"input_uri": "gs://bucket/x.parquet"}, 422, "unsafe_path"),
        ({"input_uri": "/etc/passwd", "input_format": "csv"}, 422, "unsafe_path"),
        ({"output_uri": str(platform.home / "escape")}, 422, "unsafe_path"),
        ({"input_uri": "s3://not-allowed-bucket/x.parquet"}, 422, "unsafe_path"),
    ]
    with platform.client() as c:
        for change, status, code in cases:
            r = c.post("/v1/batch/jobs", json={**base, **change})
            assert r.status_code == status, (change, r.text)
            assert r.json()["code"] == code, (change, r.text)
            assert "root:" not in r.text, r.text  # nothing of a file outside the data roots is read back
        before = len(c.get("/v1/batch/jobs", params={"limit": 500}).json()["items"])
    # Refused requests leave no job behind.
    with platform.client() as c:
        assert len(c.get("/v1/batch/jobs", params={"limit": 500}).json()["items"]) == before
        token = c.post("/v1/tokens", json={"name": "batch-predictor", "role": "predictor"}).json()["token"]
    with platform.client(token) as c:
        r = c.post("/v1/batch/jobs", json=base)
        assert r.status_code == 403 and r.json()["code"] == "permission_denied"


def test_bad_data_fails_the_job_with_a_message(platform, iris, data_dir):
    src = data_dir / "three.parquet"
    _frame(50).to_parquet(src)
    holes = _frame(30_000, seed=4)
    holes.loc[20_000, "petal_width"] = None  # an empty CSV cell, met by a predictor actor mid-run
    holey = data_dir / "holes.csv"
    holes.to_csv(holey, index=False)
    with platform.client() as c:
        r1 = c.post(
            "/v1/batch/jobs",
            json={
                "model": "iris@champion",
                "input_uri": str(src),
                "output_uri": str(data_dir / "o"),
                "feature_columns": FEATURES[:3],
            },
        )
        r2 = c.post(
            "/v1/batch/jobs",
            json={"model": "iris@champion", "input_uri": str(holey), "output_uri": str(data_dir / "o2")},
        )
        assert r1.status_code == 202 and r2.status_code == 202, (r1.text, r2.text)
    job = platform.wait_job(r1.json()["job_id"], timeout=300)
    assert job["status"] == "failed"
    assert "takes 4 features" in job["error"]
    job = platform.wait_job(r2.json()["job_id"], timeout=300)
    assert job["status"] == "failed"
    assert "petal_width" in job["error"] and "empty values" in job["error"], job["error"]


def test_s3_input_and_output(platform, iris, onnx_session):
    import pyarrow as pa

    from app.storage.s3 import s3_filesystem

    s3 = platform.s3
    bucket = s3.create_bucket("matih-batch")
    n = 20_000
    frame = _frame(n, seed=3)
    fs = s3_filesystem(platform.settings)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), f"{bucket}/in/scoring.parquet", filesystem=fs)

    job = _submit(
        platform,
        {
            "model": "iris@champion",
            "input_uri": f"s3://{bucket}/in/scoring.parquet",
            "output_uri": f"s3://{bucket}/out/run1/",
            "key_column": "row_key",
        },
    )
    assert job["progress"]["rows_done"] == job["progress"]["rows_total"] == n
    keys = s3.keys(bucket, "out/run1/")
    assert keys and all(k.split("/")[-1].startswith("part-") and k.endswith(".parquet") for k in keys)
    result = pq.read_table(f"{bucket}/out/run1", filesystem=fs).to_pandas()
    assert len(result) == n
    assert np.array_equal(result["row_key"].to_numpy(), frame["row_key"].to_numpy())
    labels, _ = _reference(onnx_session, frame)
    assert np.array_equal(result["prediction"].to_numpy(), labels)

    with platform.client() as c:  # the same folder again: not empty -> 409; a missing object -> 404
        r = c.post(
            "/v1/batch/jobs",
            json={
                "model": "iris@champion",
                "input_uri": f"s3://{bucket}/in/scoring.parquet",
                "output_uri": f"s3://{bucket}/out/run1/",
            },
        )
        assert r.status_code == 409, r.text
        r = c.post(
            "/v1/batch/jobs",
            json={
                "model": "iris@champion",
                "input_uri": f"s3://{bucket}/in/none.parquet",
                "output_uri": f"s3://{bucket}/out/run2/",
            },
        )
        assert r.status_code == 404, r.text
