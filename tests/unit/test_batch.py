"""Batch prediction without Ray: the predictor over pyarrow tables with a real ONNX model,
the submit-time checks on real files, and the /v1/batch/jobs routes on an in-process API
(jobs stay queued: the Ray Data part runs in tests/integration/test_batch.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from tests.support import in_process_context

from app.batch.predict import OnnxBatchPredictor, file_prefix, input_format_of, plan_batch
from app.batch.spec import BatchJobSpec
from app.errors import Conflict, InvalidInput, NotFound
from app.registry.mlflow_registry import TAG_CLASSES, TAG_FEATURES, ResolvedModel
from app.settings import load_settings

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def iris_onnx():
    """(ONNX bytes, fitted scikit-learn model) for iris logistic regression."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    est = LogisticRegression(max_iter=300).fit(X, y)
    model = to_onnx(
        est, X[:1].astype(np.float32), options={id(est): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3}
    )
    return model.SerializeToString(), est


def _table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": np.arange(n, dtype=np.int64),
            "sepal_length": rng.uniform(4, 8, n),
            "sepal_width": rng.uniform(2, 4.5, n),
            "petal_length": rng.uniform(1, 7, n),
            "petal_width": rng.uniform(0.1, 2.5, n),
            "city": rng.choice(["x", "y"], n),
        }
    )


MODEL = ResolvedModel("iris", "1", {TAG_FEATURES: json.dumps(FEATURES), TAG_CLASSES: json.dumps([0, 1, 2])})


# -- the predictor ---------------------------------------------------------------------------
def test_predictor_keeps_rows_order_and_columns(iris_onnx):
    onnx_model, est = iris_onnx
    table = _table(1000)
    out = OnnxBatchPredictor(onnx_model, FEATURES, ["id", "city"], probabilities=True)(table)
    assert out.column_names == ["id", "city", "prediction", "probabilities"]
    assert out.num_rows == 1000 and out.column("id").equals(table.column("id"))
    X = np.column_stack([table.column(c).to_numpy() for c in FEATURES])
    assert np.array_equal(out.column("prediction").to_numpy(), est.predict(X))
    proba = np.stack(out.column("probabilities").to_numpy(zero_copy_only=False))
    assert np.allclose(proba, est.predict_proba(X), atol=1e-5)


def test_predictor_wide_probabilities_for_csv(iris_onnx):
    out = OnnxBatchPredictor(iris_onnx[0], FEATURES, probabilities=True, classes=[0, 1, 2], wide_probabilities=True)(
        _table(10)
    )
    assert out.column_names == ["prediction", "probability_0", "probability_1", "probability_2"]


def test_predictor_refuses_nulls_and_wrong_width(iris_onnx):
    table = _table(5)
    with_null = table.set_column(1, "sepal_length", pa.array([1.0, None, 2.0, 3.0, 4.0]))
    with pytest.raises(InvalidInput, match="sepal_length.*1 empty"):
        OnnxBatchPredictor(iris_onnx[0], FEATURES)(with_null)
    with pytest.raises(InvalidInput, match="takes 4 features but 3"):
        OnnxBatchPredictor(iris_onnx[0], FEATURES[:3])


def test_predictor_casts_integer_features(iris_onnx):
    table = _table(20)
    as_int = table.set_column(1, "sepal_length", pa.array(np.full(20, 5, dtype=np.int64)))
    out = OnnxBatchPredictor(iris_onnx[0], FEATURES)(as_int)
    assert out.num_rows == 20


def test_predictor_runs_a_block_in_batches_of_batch_size(iris_onnx):
    onnx_model, est = iris_onnx
    table = _table(1000)
    whole = OnnxBatchPredictor(onnx_model, FEATURES, ["id"], probabilities=True)(table)
    sliced = OnnxBatchPredictor(onnx_model, FEATURES, ["id"], probabilities=True, batch_size=64)(table)
    assert sliced.equals(whole)


# -- sizing the pool and the blocks ----------------------------------------------------------
def test_little_model_work_gets_one_predictor_unless_the_request_names_more():
    from app.batch.predict import size_pipeline

    # 1M rows at 0.1 us/row: 0.1 s of model work, not worth a second actor process
    assert size_pipeline(1_000_000, 1e-7, 8192, 2, fixed=False)[0] == 1
    assert size_pipeline(1_000_000, 1e-7, 8192, 2, fixed=True)[0] == 2
    # 1M rows at 6 us/row: 6 s of work, every predictor allowed
    assert size_pipeline(1_000_000, 6e-6, 8192, 2, fixed=False)[0] == 2
    assert size_pipeline(1_000_000, 6e-6, 8192, 4, fixed=False)[0] == 4
    # no timing: the configured concurrency
    assert size_pipeline(1_000_000, None, 8192, 3, fixed=False)[0] == 3


def test_blocks_hold_a_bounded_amount_of_model_work():
    from app.batch.predict import _BATCHES_PER_BLOCK, _MIN_BATCHES_PER_BLOCK, size_pipeline

    cheap = size_pipeline(1_000_000, 1e-7, 8192, 2, fixed=False)[1]
    costly = size_pipeline(1_000_000, 2e-5, 8192, 2, fixed=False)[1]
    assert cheap == -(-1_000_000 // (8192 * _BATCHES_PER_BLOCK))  # big blocks: few tasks
    assert costly > cheap and costly <= -(-1_000_000 // (8192 * _MIN_BATCHES_PER_BLOCK))
    assert size_pipeline(10, 1e-5, 8192, 2, fixed=False)[1] == 2  # two per predictor, rows permitting
    assert size_pipeline(1, 1e-5, 8192, 2, fixed=False)[1] == 1


# -- reading row ranges, writing in order ----------------------------------------------------
def test_parquet_row_ranges_cover_every_row_once_in_order(tmp_path):
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    from app.batch._parquet import ParquetRowRanges, parquet_row_groups

    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(_table(2500, seed=1), folder / "b.parquet", row_group_size=700)
    pq.write_table(_table(1000, seed=2), folder / "a.parquet", row_group_size=300)
    local = pafs.LocalFileSystem()
    groups, schema = parquet_row_groups(str(folder), local)
    assert sum(g.rows for g in groups) == 3500 and groups[0].path.endswith("a.parquet")
    expected = pa.concat_tables(
        [pq.read_table(folder / f, columns=["id", "petal_width"]) for f in ("a.parquet", "b.parquet")]
    )
    source = ParquetRowRanges(groups, local, ["id", "petal_width"], schema, 16)
    for n in (1, 3, 7, 50):
        tasks = source.get_read_tasks(n)
        assert len(tasks) == n and sum(t.metadata.num_rows for t in tasks) == 3500
        got = pa.concat_tables([t for task in tasks for t in task()])
        assert got.equals(expected)
    # the job's timing sample is the first rows, read from the same layout (no second footer read)
    from app.batch.predict import BatchPlan, _sample

    plan = BatchPlan(None, str(folder), local, "parquet", str(tmp_path / "out"), local, "parquet", ["id", "petal_width"])
    for rows in (1, 300, 301, 1500, 9999):
        want = expected.slice(0, rows)
        assert _sample(plan, groups, rows=rows).equals(want)
        assert _sample(plan, None, rows=rows).equals(want)  # without the layout: pyarrow's own head


def test_output_writer_keeps_order_and_rolls_files(tmp_path):
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    from app.batch.predict import BatchPlan, _OutputWriter, count_rows, output_files

    plan = BatchPlan(
        model=MODEL, input_path="", input_fs=None, input_format="parquet", output_path=str(tmp_path),
        output_fs=pafs.LocalFileSystem(), output_format="parquet", feature_columns=FEATURES,
    )
    out = _OutputWriter(plan, "job-1", min_rows=250, uri=str(tmp_path))
    table = _table(1000).select(["id", "petal_width"])
    for start in range(0, 1000, 100):
        out.write(table.slice(start, 100))
    out.write(table.slice(0, 0))
    out.close()
    files = output_files(str(tmp_path), plan.output_fs, "job-1")
    assert len(files) == 4 and count_rows(files, plan.output_fs, "parquet") == 1000
    assert pa.concat_tables([pq.read_table(f) for f in files]).equals(table)


# -- the request and its checks --------------------------------------------------------------
def _spec(**kw) -> BatchJobSpec:
    return BatchJobSpec.model_validate({"model": "iris@champion", "input_uri": "in.parquet", "output_uri": "out", **kw})


def test_spec_validation():
    with pytest.raises(ValueError, match="parquet"):
        _spec(format="xlsx")
    with pytest.raises(ValueError, match="clashes"):
        _spec(key_column="prediction")
    with pytest.raises(ValueError, match="named twice"):
        _spec(key_column="id", passthrough_columns=["id"])
    assert input_format_of(_spec(input_uri="s3://b/x.CSV")) == "csv"
    assert input_format_of(_spec(input_uri="s3://b/folder/", input_format="parquet")) == "parquet"
    with pytest.raises(InvalidInput, match="input_format"):
        input_format_of(_spec(input_uri="/data/folder"))


@pytest.fixture
def files(tmp_path):
    _table(100).to_pandas().to_parquet(tmp_path / "in.parquet")
    _table(100).to_pandas().to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.parquet").write_text("x")
    return tmp_path


def test_plan_checks_input_output_and_columns(files):
    settings = load_settings("local", matih_home=str(files / "home"))
    d = files

    def plan(**kw):
        return plan_batch(
            _spec(**{"input_uri": str(d / "in.parquet"), "output_uri": str(d / "out"), **kw}), settings, MODEL
        )

    p = plan(key_column="id", passthrough_columns=["city"])
    assert p.feature_columns == FEATURES and p.keep_columns == ["id", "city"] and p.input_format == "parquet"
    assert (
        plan_batch(_spec(input_uri=f"file://{d / 'in.csv'}", output_uri=str(d / "o")), settings, MODEL).input_format
        == "csv"
    )
    with pytest.raises(NotFound):
        plan(input_uri=str(d / "missing.parquet"))
    with pytest.raises(InvalidInput, match="cannot be read as parquet"):
        plan(input_uri=str(d / "bad.parquet"))
    with pytest.raises(Conflict, match="not empty"):
        plan(output_uri=str(d / "full"))
    with pytest.raises(Conflict, match="is a file"):
        plan(output_uri=str(d / "in.csv"))
    with pytest.raises(InvalidInput, match="must differ"):
        plan(output_uri=str(d / "in.parquet"))
    with pytest.raises(InvalidInput, match=r"\['nope'\]"):
        plan(key_column="nope")
    with pytest.raises(InvalidInput, match="not numeric"):
        plan(feature_columns=["sepal_length", "city", "petal_length", "petal_width"])
    with pytest.raises(InvalidInput, match="trained on"):
        plan_batch(
            _spec(input_uri=str(d / "in.parquet"), output_uri=str(d / "out")),
            settings,
            ResolvedModel("iris", "1", {TAG_FEATURES: json.dumps(["f0", "f1", "f2", "f3"])}),
        )
    # No recorded feature names: every numeric column but the kept ones.
    untagged = ResolvedModel("iris", "1", {})
    p = plan_batch(
        _spec(input_uri=str(d / "in.parquet"), output_uri=str(d / "out"), key_column="id"), settings, untagged
    )
    assert p.feature_columns == FEATURES


def test_output_file_names_sort_in_row_order():
    from app.batch.predict import file_name

    names = [file_name("0123456789abcdef", i, "parquet") for i in (0, 2, 10, 100, 1000)]
    assert names == sorted(names) and all(n.startswith(file_prefix("0123456789abcdef")) for n in names)


# -- the routes, in process ------------------------------------------------------------------
class _QueueOnly:
    """JobControl that only queues: no scheduler runs, so submitted jobs stay queued."""

    def __init__(self):
        self.notified = 0

    async def notify(self) -> None:
        self.notified += 1

    async def cancel(self, job_id, actor):
        raise AssertionError("not used")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    import os

    from app.api.app import create_app
    from app.bootstrap import prepare
    from app.schemas import TrainingJobSpec
    from app.training.pipeline import train_sklearn

    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which load_settings reads: name this
    # module's MLflow explicitly and put the environment back afterwards.
    saved_env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    home = tmp_path_factory.mktemp("batch_home")
    settings = load_settings("local", matih_home=str(home), mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    prepared = prepare(settings)
    train_sklearn(
        TrainingJobSpec.model_validate(
            {
                "name": "iris",
                "estimator": "sklearn.linear_model.LogisticRegression",
                "hyperparameters": {"max_iter": 300},
                "dataset": {"uri": "builtin://iris", "target": "target"},
                "register_as": "iris",
            }
        ),
        settings,
        "train-1",
        lambda p, line=None: None,
    )
    jobs = _QueueOnly()
    ctx = in_process_context(settings, prepared.admin_token, jobs)
    store = ctx.store
    client = TestClient(create_app(ctx))
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    data = home / "data"  # the default data root: job specs may name only paths under it
    data.mkdir()
    _table(50).to_pandas().to_parquet(data / "in.parquet")
    yield client, data, jobs, settings
    store.dispose()
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        if key not in saved_env:
            del os.environ[key]
    os.environ.update(saved_env)


def test_submit_queues_a_batch_prediction_job(api):
    client, home, jobs, settings = api
    before = jobs.notified
    r = client.post(
        "/v1/batch/jobs",
        json={
            "model": "iris@champion",
            "input_uri": str(home / "in.parquet"),
            "output_uri": str(home / "out"),
            "key_column": "id",
        },
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert jobs.notified == before + 1
    job = client.get(f"/v1/batch/jobs/{job_id}").json()
    assert job["kind"] == "batch_prediction" and job["status"] == "queued" and job["name"] == "batch-iris"
    assert job["spec"]["resources"]["num_cpus"] == settings.batch.driver_num_cpus
    assert BatchJobSpec.model_validate(job["spec"]).key_column == "id"  # what the runner reads back
    assert client.get(f"/v1/jobs/{job_id}").json()["kind"] == "batch_prediction"
    assert job_id in [j["job_id"] for j in client.get("/v1/batch/jobs").json()["items"]]
    assert "/v1/batch/jobs" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "change, status",
    [
        ({"model": "nope@champion"}, 404),
        ({"model": "not a target!"}, 422),
        ({"format": "json"}, 422),
        ({"input_uri": "missing.parquet"}, 404),
        ({"input_uri": "in.txt"}, 422),
        ({"concurrency": 0}, 422),
        ({"unknown_field": 1}, 422),
    ],
)
def test_submit_refusals(api, change, status):
    client, home, _, _ = api
    body = {"model": "iris@champion", "input_uri": str(home / "in.parquet"), "output_uri": str(home / "out2")}
    if "input_uri" in change:
        change = {"input_uri": str(home / change["input_uri"])}
    r = client.post("/v1/batch/jobs", json={**body, **change})
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error", "code"}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"input_uri": "/etc/passwd", "input_format": "csv"}, "input_uri"),
        ({"input_uri": "file:///etc/passwd", "input_format": "csv"}, "input_uri"),
        ({"input_uri": "{data}/../admin_token", "input_format": "csv"}, "input_uri"),
        ({"input_uri": "{data}/%2e%2e/admin_token", "input_format": "csv"}, "input_uri"),
        ({"input_uri": "s3://someone-elses-bucket/x.parquet"}, "input_uri"),
        ({"output_uri": "/tmp/matih-batch-escape"}, "output_uri"),
        ({"output_uri": "{data}/link-out/predictions"}, "output_uri"),
    ],
)
def test_submit_refuses_paths_outside_the_data_roots(api, change, field):
    """Job paths resolve inside settings.storage.data_roots (symlinks followed) or are a 422
    naming the field; nothing of the named file reaches the error body."""
    import os

    client, data, _, _ = api
    if not (data / "link-out").exists():
        os.symlink("/tmp", data / "link-out")
    body = {"model": "iris@champion", "input_uri": str(data / "in.parquet"), "output_uri": str(data / "out3")}
    change = {k: v.replace("{data}", str(data)) if isinstance(v, str) else v for k, v in change.items()}
    r = client.post("/v1/batch/jobs", json={**body, **change})
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["code"] == "unsafe_path" and out["details"]["field"] == field, out
    assert "root:" not in r.text and "mtk_admin" not in r.text


def test_relative_paths_are_under_the_first_data_root(api):
    client, data, _, _ = api
    body = {"model": "iris@champion", "input_uri": "in.parquet", "output_uri": "rel-out"}
    r = client.post("/v1/batch/jobs", json=body)
    assert r.status_code == 202, r.text
    spec = client.get(f"/v1/batch/jobs/{r.json()['job_id']}").json()["spec"]
    assert spec["input_uri"] == os.path.realpath(data / "in.parquet")
    assert spec["output_uri"] == os.path.realpath(data / "rel-out")


def test_unreadable_input_errors_do_not_echo_the_file(files):
    """A file inside a data root that is not CSV: the error summarizes pyarrow's, without the row."""
    (files / "data").mkdir()
    (files / "data" / "rows.csv").write_text("a,b\n1,2\nsecret-row-text\n")
    settings = load_settings("local", matih_home=str(files))
    spec = _spec(input_uri=str(files / "data" / "rows.csv"), output_uri=str(files / "data" / "o"), input_format="csv")
    with pytest.raises(InvalidInput, match="Expected 2 columns, got 1") as info:
        plan_batch(spec, settings, MODEL)
    assert "secret-row-text" not in info.value.message


def test_the_job_checks_its_paths_again(api):
    """A spec that reached the store without the API's check (written by hand, or before the
    data roots changed) fails in the job, before anything is read."""
    from app.jobs.runner import run_job
    from app.store import MetadataStore

    _, data, _, settings = api
    store = MetadataStore.from_settings(settings)
    spec = {"model": "iris@champion", "input_uri": "/etc/passwd", "input_format": "csv", "output_uri": str(data / "o9")}
    job = store.create_job("batch_prediction", "by-hand", spec, "admin")
    store.transition_job(job["job_id"], "running")
    done = run_job(job["job_id"], settings, store)
    assert done["status"] == "failed" and done["error"].startswith("unsafe_path: input_uri '/etc/passwd' is refused")
    assert "root:" not in done["error"] and "root:" not in store.get_job(job["job_id"], with_logs=True)["logs"]
    store.dispose()
