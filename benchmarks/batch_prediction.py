"""Batch prediction: the platform's Ray Data job path against a single-process loop, side by
side in one run, on the same file and the same registered ONNX model.

  (a) single process  pandas.read_parquet -> for each batch: ONNX Runtime session.run ->
                      DataFrame(id, prediction) -> to_parquet; the session options of the
                      batch predictors (settings.batch.onnx_intra_op_threads intra-op threads);
  (b) Ray Data job    app.batch.predict.run_batch_prediction, the function a batch_prediction
                      job runs, inside a Ray task sized like the JobScheduler sizes it
                      (settings.batch.driver_num_cpus): read parquet, actor pool of ONNX
                      Runtime predictors (settings.batch.concurrency actors x
                      worker_num_cpus), write parquet, verify the row count;
  (c) one process,    the loop of (a) with ONNX Runtime's default intra-op threads (one per
      all cores       core): what one process gets out of the machine on its own. The target
                      is judged against (a), the loop at the predictors' own thread count;
                      (b)/(c) is printed beside it so that nobody mistakes the one for the other.
  (d) bare Ray Data   read_parquet -> map_batches setting a constant -> write_parquet, no model
                      and no platform code, once per run: the floor under any Ray Data job on
                      this file, to set beside (a) for a model whose work is almost nothing.

The script makes a temporary MATIH_HOME with SQLite MLflow, trains and registers each model
with the platform's trainer (app/training/pipeline.py: train_sklearn), generates ROWS rows of
iris-like data (the four iris features drawn uniformly over their ranges, plus an id), starts
a local Ray cluster (RAY_ADDRESS to use another), warms both paths up on a small file, then
times each path end to end: input file to output folder, model already in the registry.
Each path runs --repeat times, interleaved (a, b, a, b, ...); the medians are shown. Both
outputs are checked equal. It prints rows/s of each path and the ratio (b)/(a), per model:

  logreg    LogisticRegression: ~30 ns of ONNX work per row, so the run measures the job's
            fixed costs (actor start, scheduling, files) against a loop that is almost free;
  forest    RandomForestClassifier(300 trees): ~6 us per row on one core;
  boosting  GradientBoostingClassifier(300 rounds x 3 classes): ~7 us per row;
  forest1000  RandomForestClassifier(1000 trees): ~20 us per row. In the last three the time
            goes into the model, which the actor pool spreads over the cores.

    .venv/bin/python benchmarks/batch_prediction.py [--rows 1000000] [--repeat 3]
        [--models logreg,forest,boosting,forest1000]

The target is (b)/(a) >= 1.0 on 2 cores for the model-bound cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_RATIO = 1.0
MODELS = {
    "logreg": ("sklearn.linear_model.LogisticRegression", {"max_iter": 300}),
    "forest": ("sklearn.ensemble.RandomForestClassifier", {"n_estimators": 300, "random_state": 0}),
    "boosting": ("sklearn.ensemble.GradientBoostingClassifier", {"n_estimators": 300, "random_state": 0}),
    "forest1000": ("sklearn.ensemble.RandomForestClassifier", {"n_estimators": 1000, "random_state": 0}),
}
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    import pandas as pd

    rng = np.random.default_rng(seed)
    pd.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "sepal_length": rng.uniform(4.3, 7.9, rows),
            "sepal_width": rng.uniform(2.0, 4.4, rows),
            "petal_length": rng.uniform(1.0, 6.9, rows),
            "petal_width": rng.uniform(0.1, 2.5, rows),
        }
    ).to_parquet(path, row_group_size=128 * 1024)


def train(settings, name: str) -> None:
    from app.schemas import TrainingJobSpec
    from app.training.pipeline import train_sklearn

    estimator, params = MODELS[name]
    spec = TrainingJobSpec.model_validate(
        {
            "name": f"bench-{name}",
            "estimator": estimator,
            "hyperparameters": params,
            "dataset": {"uri": "builtin://iris", "target": "target"},
            "register_as": f"iris_{name}",
        }
    )
    train_sklearn(spec, settings, f"bench-train-{name}", lambda progress, line=None: None)


def single_process(settings, model_name: str, src: Path, out: Path, batch_size: int, threads: int | None = None) -> float:
    """(a): the loop a user would write with pandas and ONNX Runtime. Returns seconds.
    ``threads``: ONNX Runtime intra-op threads (None: those of a batch predictor; 0: ONNX
    Runtime's default, one per core)."""
    import onnxruntime as ort
    import pandas as pd

    from app.runtimes.onnx import session_options  # the predictors' own options
    from app.registry.mlflow_registry import ModelRegistry

    registry = ModelRegistry(settings)
    onnx_path = next(registry.download(registry.resolve(f"{model_name}@champion")).rglob("*.onnx"))
    started = time.perf_counter()
    opts = session_options(settings.batch.onnx_intra_op_threads if threads is None else threads)
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    label = session.get_outputs()[0].name
    frame = pd.read_parquet(src)
    X = frame[FEATURES].to_numpy(dtype=np.float32)
    preds = [session.run([label], {name: X[i : i + batch_size]})[0] for i in range(0, len(X), batch_size)]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": frame["id"].to_numpy(), "prediction": np.concatenate(preds)}).to_parquet(out / "part-0.parquet")
    return time.perf_counter() - started


def ray_job(settings, model_name: str, src: Path, out: Path, job_id: str) -> tuple[float, dict]:
    """(b): the batch_prediction job's work in a Ray task, as the JobScheduler runs it."""
    import ray

    @ray.remote(max_retries=0)
    def _job(kwargs: dict, spec: dict, job_id: str) -> dict:
        from app.batch.predict import run_batch_prediction
        from app.batch.spec import BatchJobSpec
        from app.settings import Settings

        return run_batch_prediction(
            BatchJobSpec.model_validate(spec), Settings(**kwargs), job_id, lambda p, line=None: None
        )

    spec = {"model": f"{model_name}@champion", "input_uri": str(src), "output_uri": str(out), "key_column": "id"}
    started = time.perf_counter()
    result = ray.get(
        _job.options(num_cpus=settings.batch.driver_num_cpus).remote(settings.to_init_kwargs(), spec, job_id)
    )
    return time.perf_counter() - started, result


def bare_ray_data(src: Path, out: Path) -> float:
    """(d): Ray Data with no model and no platform code: ``read_parquet`` -> a ``map_batches``
    that only sets a constant prediction -> ``write_parquet``. What any Ray Data job over this
    file costs before it does any work. Returns seconds."""
    import ray

    def constant(batch: dict) -> dict:
        return {"id": batch["id"], "prediction": np.zeros(len(batch["id"]), dtype=np.int64)}

    started = time.perf_counter()
    ray.data.read_parquet(str(src)).map_batches(constant, batch_format="numpy", batch_size=None).write_parquet(str(out))
    return time.perf_counter() - started


def same_predictions(a: Path, b: Path) -> bool:
    import pandas as pd

    left = pd.read_parquet(a)
    right = pd.concat([pd.read_parquet(p) for p in sorted(b.glob("part-*"))], ignore_index=True)
    return (
        len(left) == len(right)
        and bool((left["id"].to_numpy() == right["id"].to_numpy()).all())
        and bool((left["prediction"].to_numpy() == right["prediction"].to_numpy()).all())
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--models", default="logreg,forest,boosting,forest1000", help=f"comma-separated, of: {', '.join(MODELS)}"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path; medians are shown")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")

    import ray

    from app.bootstrap import prepare
    from app.settings import load_settings

    load_before = os.getloadavg()[0]
    home = Path(tempfile.mkdtemp(prefix="matih-bench-batch-"))
    try:
        settings = load_settings(
            "local",
            matih_home=str(home),
            mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
            auth={"enabled": False},
        )
        prepare(settings)
        print(f"training {', '.join(models)} ...", flush=True)
        for m in models:
            train(settings, m)
        small, big = home / "warmup.parquet", home / "input.parquet"
        make_data(small, 20_000, seed=1)
        make_data(big, args.rows)
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            num_cpus=None if os.environ.get("RAY_ADDRESS") else 2,
            include_dashboard=False,
            log_to_driver=False,
        )
        b = settings.batch
        bare_ray_data(small, home / "warm-d")
        runs_d = []
        for i in range(args.repeat):
            runs_d.append(bare_ray_data(big, home / f"out-d-{i}"))
        rows_results = []
        for m in models:
            name = f"iris_{m}"
            single_process(settings, name, small, home / f"warm-a-{m}", b.batch_size)  # imports, model cache
            ray_job(settings, name, small, home / f"warm-b-{m}", f"warm{m}")  # worker processes, imports
            runs_a, runs_b, runs_c = [], [], []
            for i in range(args.repeat):  # interleaved, so a passing disturbance hits every path
                shutil.rmtree(home / f"out-a-{m}", ignore_errors=True)
                runs_a.append(single_process(settings, name, big, home / f"out-a-{m}", b.batch_size))
                shutil.rmtree(home / f"out-c-{m}", ignore_errors=True)
                runs_c.append(single_process(settings, name, big, home / f"out-c-{m}", b.batch_size, threads=0))
                t, result = ray_job(settings, name, big, home / f"out-b-{m}-{i}", f"bench{m}{i}")
                assert result["rows"] == args.rows, result
                runs_b.append(t)
            t_a, t_b, t_c = float(np.median(runs_a)), float(np.median(runs_b)), float(np.median(runs_c))
            equal = same_predictions(home / f"out-a-{m}" / "part-0.parquet", home / f"out-b-{m}-0")
            rows_results.append(
                {
                    "model": m,
                    "estimator": MODELS[m][0].rsplit(".", 1)[1],
                    "rows": args.rows,
                    "single_s": t_a,
                    "ray_s": t_b,
                    "single_runs_s": runs_a,
                    "ray_runs_s": runs_b,
                    "single_rows_s": args.rows / t_a,
                    "ray_rows_s": args.rows / t_b,
                    "ratio": t_a / t_b,
                    "single_all_cores_s": t_c,
                    "single_all_cores_runs_s": runs_c,
                    "single_all_cores_rows_s": args.rows / t_c,
                    "ratio_all_cores": t_c / t_b,
                    "same_predictions": equal,
                }
            )
        ray.shutdown()
    finally:
        shutil.rmtree(home, ignore_errors=True)

    cpus = os.cpu_count()
    print()
    print(
        f"batch prediction, {args.rows:,} rows, {cpus} CPUs ({platform.machine()}), load average "
        f"{load_before:.2f} before / {os.getloadavg()[0]:.2f} after; median of {args.repeat}; "
        f"batch_size {b.batch_size}, {b.concurrency} predictor actors x "
        f"{b.worker_num_cpus} CPU, {b.onnx_intra_op_threads} ONNX thread each"
    )
    print(f"{'model':<10} {'(a) single process':>22} {'(b) Ray Data job':>22} {'(b)/(a)':>8}  same output"
          f" {'(c) one process, all cores':>28} {'(b)/(c)':>8}")
    for r in rows_results:
        print(
            f"{r['model']:<10} {r['single_rows_s']:>12,.0f} rows/s {r['single_s']:>5.1f}s"
            f" {r['ray_rows_s']:>12,.0f} rows/s {r['ray_s']:>5.1f}s {r['ratio']:>8.2f}  {str(r['same_predictions']):<11}"
            f" {r['single_all_cores_rows_s']:>18,.0f} rows/s {r['single_all_cores_s']:>5.1f}s {r['ratio_all_cores']:>8.2f}"
        )
    t_d = float(np.median(runs_d))
    print(
        f"(d) bare Ray Data, no model (read_parquet -> constant map_batches -> write_parquet): "
        f"{args.rows / t_d:,.0f} rows/s {t_d:.1f}s; the floor of any Ray Data job over this file"
    )
    for r in rows_results:
        if r["model"] != "logreg":
            verdict = "met" if r["ratio"] >= TARGET_RATIO else "NOT met"
            print(f"target (b)/(a) >= {TARGET_RATIO} for the model-bound case {r['model']}: {verdict}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpus": cpus, "results": rows_results, "bare_ray_data_s": t_d, "bare_ray_data_runs_s": runs_d},
                       indent=2)
        )
    return 0 if all(r["same_predictions"] for r in rows_results) else 1


if __name__ == "__main__":
    sys.exit(main())
