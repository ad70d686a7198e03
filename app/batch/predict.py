"""Batch prediction with Ray Data: read parquet or CSV (local or S3), run an actor pool of ONNX
Runtime predictors over batches, write parquet or CSV with exactly one row per input row.

:func:`plan_batch` checks a request against the model and the input before anything runs
(the API calls it at submit time, the job again when it starts); :func:`run_batch_prediction`
is the job itself, executed by ``app.jobs.runner`` inside the Ray task the JobScheduler
launches. :class:`OnnxBatchPredictor` is plain Python over pyarrow tables, so it is tested
without Ray; Ray Data runs one instance per actor.

Order: Ray Data runs with ``preserve_order``, so write task *n* holds the rows after those
of task *n-1*; files are named ``part-<job>-<n>``, and reading them in name order gives the
input order. A ``key_column`` carries the user's own key as well.
"""

from __future__ import annotations

import logging
import math
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.batch.spec import BatchJobSpec
from app.errors import Conflict, DependencyUnavailable, InvalidInput, ModelError, NotFound
from app.registry.mlflow_registry import ModelRegistry, ResolvedModel, check_servable, model_metadata
from app.settings import Settings
from app.storage.s3 import configure_s3_env, is_s3, resolve_uri

log = logging.getLogger(__name__)
Reporter = Callable[[dict[str, Any], str | None], None]
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_BATCHES_PER_BLOCK = 16  # predictors iterate the batches of a block inside one call
_MAX_BLOCKS = 2000
_NO_PROGRESS_TIMEOUT_S = 600  # no block read, predicted or written for this long: the job fails


@dataclass
class BatchPlan:
    """A checked request: where to read and write, in which formats, which columns."""

    model: ResolvedModel
    input_path: str
    input_fs: Any
    input_format: str
    output_path: str
    output_fs: Any
    output_format: str
    feature_columns: list[str]
    keep_columns: list[str] = field(default_factory=list)


def input_format_of(spec: BatchJobSpec) -> str:
    if spec.input_format:
        return spec.input_format
    suffix = posixpath.splitext(spec.input_uri.rstrip("/"))[1].lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    raise InvalidInput(
        f"cannot tell the format of input_uri {spec.input_uri!r} from its suffix; end it in .parquet or .csv, "
        "or set input_format to 'parquet' or 'csv'",
        details={"field": "input_format"},
    )


def _fs_call(uri: str, fn: Callable[[], Any]) -> Any:
    """Run a filesystem call, turning connection trouble into DependencyUnavailable."""
    try:
        return fn()
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:
        if is_s3(uri):
            raise DependencyUnavailable(f"S3 is unavailable for {uri}: {exc}") from None
        raise InvalidInput(f"{uri}: {exc}") from None


def _input_schema(path: str, fs, fmt: str, uri: str):
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    info = _fs_call(uri, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.NotFound:
        raise NotFound(f"input_uri {uri!r} does not exist", details={"field": "input_uri"})
    try:
        return _fs_call(uri, lambda: pads.dataset(path, filesystem=fs, format=fmt).schema)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"input_uri {uri!r} does not exist", details={"field": "input_uri"}) from None
    except Exception as exc:  # pyarrow.ArrowInvalid: not that format, no files, corrupt footer
        if isinstance(exc, (DependencyUnavailable, NotFound)):
            raise
        raise InvalidInput(
            f"input_uri {uri!r} cannot be read as {fmt}: {exc}", details={"field": "input_uri"}
        ) from None


def _check_output_empty(path: str, fs, uri: str) -> None:
    from pyarrow import fs as pafs

    info = _fs_call(uri, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.File:
        raise Conflict(f"output_uri {uri!r} is a file; name a folder to write into", details={"field": "output_uri"})
    if info.type == pafs.FileType.Directory or is_s3(uri):
        found = _fs_call(uri, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
        if found:
            raise Conflict(
                f"output_uri {uri!r} is not empty; choose a new folder so results never mix with other files",
                details={"field": "output_uri"},
            )


def plan_batch(
    spec: BatchJobSpec, settings: Settings, model: ResolvedModel, *, check_output: bool = True, submit: bool = False
) -> BatchPlan:
    """Check a request before it runs: formats, the input exists and has the columns, the
    output folder is empty. ``submit`` uses short S3 timeouts (an HTTP request waits)."""
    fs_kwargs = {"connect_timeout_s": 3.0, "attempts": 1} if submit else {}
    in_fmt = input_format_of(spec)
    in_path, in_fs = resolve_uri(spec.input_uri, settings, **fs_kwargs)
    out_path, out_fs = resolve_uri(spec.output_uri, settings, **fs_kwargs)
    if in_path.rstrip("/") == out_path.rstrip("/") and in_fs.type_name == out_fs.type_name:
        raise InvalidInput("output_uri must differ from input_uri", details={"field": "output_uri"})
    schema = _input_schema(in_path, in_fs, in_fmt, spec.input_uri)
    columns = list(schema.names)

    keep = ([spec.key_column] if spec.key_column else []) + list(spec.passthrough_columns)
    missing = [c for c in keep if c not in columns]
    if missing:
        raise InvalidInput(
            f"columns {missing} are not in the input; it has: {', '.join(columns)}",
            details={"field": "key_column" if spec.key_column in missing else "passthrough_columns"},
        )
    features = spec.feature_columns or model_metadata(model).get("feature_names")
    if features:
        absent = [c for c in features if c not in columns]
        if absent:
            hint = (
                ""
                if spec.feature_columns
                else f" (model {model.model_id} was trained on {features}; set feature_columns to map others)"
            )
            raise InvalidInput(
                f"feature columns {absent} are not in the input; it has: {', '.join(columns)}{hint}",
                details={"field": "feature_columns"},
            )
    else:
        import pyarrow.types as pat

        features = [
            f.name for f in schema if f.name not in keep and (pat.is_integer(f.type) or pat.is_floating(f.type))
        ]
        if not features:
            raise InvalidInput(
                "the input has no numeric columns to use as features", details={"field": "feature_columns"}
            )
    import pyarrow.types as pat

    not_numeric = [
        c
        for c in features
        if not (
            pat.is_integer(schema.field(c).type)
            or pat.is_floating(schema.field(c).type)
            or pat.is_boolean(schema.field(c).type)
        )
    ]
    if not_numeric:
        raise InvalidInput(
            f"feature columns {not_numeric} are not numeric; encode them before batch prediction",
            details={"field": "feature_columns"},
        )
    if check_output:
        _check_output_empty(out_path, out_fs, spec.output_uri)
    return BatchPlan(
        model=model,
        input_path=in_path,
        input_fs=in_fs,
        input_format=in_fmt,
        output_path=out_path,
        output_fs=out_fs,
        output_format=spec.format,
        feature_columns=list(features),
        keep_columns=keep,
    )


# -- the predictor ---------------------------------------------------------------------------
class OnnxBatchPredictor:
    """One ONNX Runtime session; called with pyarrow tables, returns the output table
    (kept columns, ``prediction``, optional probabilities) with the same rows in the same order.

    Ray Data constructs one per actor of the pool (``map_batches(OnnxBatchPredictor, ...)``).
    """

    def __init__(
        self,
        onnx_model: bytes,
        feature_columns: list[str],
        keep_columns: list[str] | None = None,
        *,
        probabilities: bool = False,
        classes: list[Any] | None = None,
        wide_probabilities: bool = False,
        intra_op_threads: int = 1,
        counter: Any = None,
    ):
        import onnxruntime as ort

        from app.runtimes.onnx import available_providers

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(onnx_model, sess_options=opts, providers=available_providers())
        except Exception as exc:
            raise ModelError(f"ONNX Runtime could not load the model: {exc}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        width = inp.shape[1] if len(inp.shape) == 2 and isinstance(inp.shape[1], int) else None
        if width is not None and width != len(feature_columns):
            raise InvalidInput(
                f"the model takes {width} features but {len(feature_columns)} feature columns were given: "
                f"{feature_columns}",
                details={"field": "feature_columns"},
            )
        outputs = [o.name for o in self.session.get_outputs()]
        self.label_out = next((o for o in outputs if o.lower().startswith("label")), outputs[0])
        self.proba_out = next((o for o in outputs if "prob" in o.lower()), None)
        self.feature_columns = list(feature_columns)
        self.keep_columns = list(keep_columns or [])
        self.probabilities = bool(probabilities and self.proba_out)
        self.classes = classes
        self.wide_probabilities = wide_probabilities
        self.counter = counter

    def features(self, batch) -> np.ndarray:
        """The batch's feature columns as a C-ordered float32 matrix; nulls are refused."""
        out = np.empty((batch.num_rows, len(self.feature_columns)), dtype=np.float32)
        for j, name in enumerate(self.feature_columns):
            col = batch.column(name)
            if col.null_count:
                raise InvalidInput(
                    f"feature column {name!r} has {col.null_count} empty values in a batch; fill them first"
                )
            out[:, j] = col.to_numpy()
        return out

    def __call__(self, batch):
        import pyarrow as pa

        wanted = [self.label_out] + ([self.proba_out] if self.probabilities else [])
        try:
            outs = self.session.run(wanted, {self.input_name: self.features(batch)})
        except InvalidInput:
            raise
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed on a batch of {batch.num_rows} rows: {exc}") from None
        pred = np.asarray(outs[0])
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        columns = {name: batch.column(name) for name in self.keep_columns}
        columns["prediction"] = pa.array(pred)
        if self.probabilities:
            proba = np.ascontiguousarray(outs[1], dtype=np.float32)
            if self.wide_probabilities:  # CSV has no list type: one column per class
                names = self.classes if self.classes and len(self.classes) == proba.shape[1] else range(proba.shape[1])
                for j, cls in enumerate(names):
                    columns[f"probability_{cls}"] = pa.array(proba[:, j])
            else:
                columns["probabilities"] = pa.FixedSizeListArray.from_arrays(
                    pa.array(proba.reshape(-1)), proba.shape[1]
                )
        if self.counter is not None:
            self.counter.add.remote(batch.num_rows)  # fire and forget: progress only
        return pa.table(columns)


class RowCounter:
    """Rows predicted so far, summed from every predictor actor (a retried block counts twice;
    the driver caps the figure and replaces it by the rows written at the end)."""

    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def total(self) -> int:
        return self.rows


# -- output files ----------------------------------------------------------------------------
def file_prefix(job_id: str) -> str:
    return f"part-{job_id[:12]}-"


def _job_files(job_id: str, fmt: str):
    from ray.data.datasource import FilenameProvider

    class _JobFiles(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            # Ray requires the write id in the name; task index first keeps name order = row order.
            return f"{file_prefix(job_id)}{task_index:06d}-{write_uuid}.{fmt}"

    return _JobFiles(file_format=fmt)


def output_files(path: str, fs, job_id: str) -> list[str]:
    """This job's output files under ``path``, in row order."""
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    prefix = file_prefix(job_id)
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.startswith(prefix))


def count_rows(files: list[str], fs, fmt: str) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    total = 0
    for path in files:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        else:
            with fs.open_input_stream(path) as f:
                total += pacsv.read_csv(f).num_rows
    return total


# -- the job ---------------------------------------------------------------------------------
def count_input_rows(plan: BatchPlan) -> int:
    """Rows of a parquet input from its footers alone (no data read)."""
    import pyarrow.dataset as pads

    return pads.dataset(plan.input_path, filesystem=plan.input_fs, format="parquet").count_rows()


def _model_bytes(registry: ModelRegistry, model: ResolvedModel) -> bytes:
    from app.runtimes.onnx import find_onnx_file

    meta = model_metadata(model)
    if "onnx" not in meta.get("formats", [meta["format"]]):
        raise InvalidInput(
            f"model {model.model_id} is in format {meta['format']!r} and has no ONNX artifact; batch prediction "
            "runs ONNX models only (convert the version to ONNX first)",
            details={"field": "model"},
        )
    return find_onnx_file(registry.download(model)).read_bytes()


class _ProgressWatcher(threading.Thread):
    """Records rows done from the counter actor every ``interval`` seconds while the write runs."""

    def __init__(self, counter, rows_total: int, report: Reporter, interval: float):
        super().__init__(daemon=True, name="batch-progress")
        self.counter, self.rows_total, self.report, self.interval = counter, rows_total, report, interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        import ray

        last = -1
        while not self.stop_event.wait(self.interval):
            try:
                done = min(int(ray.get(self.counter.total.remote(), timeout=10)), self.rows_total)
                if done != last:
                    self.report({"rows_done": done}, None)
                    last = done
            except Exception:  # progress is best effort; the job's outcome does not depend on it
                log.debug("progress update failed", exc_info=True)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=15)


def _read(plan: BatchPlan, num_cpus: float, blocks: int | None = None):
    """The input as a Ray Data dataset of just the needed columns; every read task asks for
    ``num_cpus`` (V1 datasources: V2 parquet reads add a listing task of 1 CPU, which would
    not fit next to the platform and the predictor pool on 2 cores)."""
    import ray.data

    columns = list(dict.fromkeys(plan.keep_columns + plan.feature_columns))
    kwargs: dict[str, Any] = {"filesystem": plan.input_fs, "num_cpus": num_cpus}
    if blocks:
        kwargs["override_num_blocks"] = blocks
    if plan.input_format == "parquet":
        return ray.data.read_parquet(plan.input_path, columns=columns, **kwargs)
    import pyarrow.csv as pacsv

    return ray.data.read_csv(plan.input_path, convert_options=pacsv.ConvertOptions(include_columns=columns), **kwargs)


def _data_context(settings: Settings):
    """A copy of this process's Ray Data context with the batch job's options; used with
    ``DataContext.current(...)`` so that nothing leaks into later work in the same worker."""
    from ray.data import DataContext

    ctx = DataContext.get_current().copy()
    ctx.use_datasource_v2 = False  # see _read: every task of the pipeline is sized by the settings
    ctx.execution_no_progress_timeout_s = _NO_PROGRESS_TIMEOUT_S  # fail, rather than wait forever, for CPUs
    ctx.execution_options.preserve_order = True  # write task n follows task n-1: stable row order
    ctx.retried_map_errors = True  # a block whose prediction raised is tried again ...
    ctx.max_map_retries = settings.batch.max_block_retries  # ... this many times
    ctx.max_errored_blocks = 0  # never drop rows: one failed block fails the job
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ctx


def run_batch_prediction(spec: BatchJobSpec, settings: Settings, job_id: str, report: Reporter) -> dict[str, Any]:
    """The ``batch_prediction`` job: resolve, check, predict every row, write, verify the count."""
    from ray.data import DataContext

    configure_s3_env(settings)
    started = time.monotonic()
    registry = ModelRegistry(settings)
    model = registry.resolve(spec.model, use_cache=False)
    check_servable(model)
    # The output was checked empty at submit; here only this job's own files (an earlier,
    # interrupted attempt) are removed, so a re-run never duplicates rows.
    plan = plan_batch(spec, settings, model, check_output=False)
    for path in output_files(plan.output_path, plan.output_fs, job_id):
        plan.output_fs.delete_file(path)
    onnx_model = _model_bytes(registry, model)
    report(
        {"stage": "reading", "model": model.name, "model_version": model.version, "rows_done": 0, "rows_total": None},
        f"batch prediction with {model.model_id}: {spec.input_uri} -> {spec.output_uri} ({spec.format}), "
        f"{spec.concurrency or settings.batch.concurrency} predictor(s) x "
        f"{spec.batch_size or settings.batch.batch_size} rows",
    )
    # Fail fast on a model that cannot take these columns, before any actor starts.
    OnnxBatchPredictor(onnx_model, plan.feature_columns, plan.keep_columns)

    with DataContext.current(_data_context(settings)):
        rows_total = _predict_and_write(spec, settings, plan, onnx_model, job_id, report)

    files = output_files(plan.output_path, plan.output_fs, job_id)
    rows_out = count_rows(files, plan.output_fs, plan.output_format)
    if rows_out != rows_total:
        raise ModelError(
            f"wrote {rows_out} rows for {rows_total} input rows; the output in {spec.output_uri} is incomplete"
        )
    seconds = time.monotonic() - started
    report(
        {"stage": "done", "rows_done": rows_out},
        f"wrote {rows_out} rows in {len(files)} file(s) in {seconds:.1f}s",
    )
    return {
        "model": model.name,
        "model_version": model.version,
        "output_uri": spec.output_uri,
        "format": spec.format,
        "rows": rows_out,
        "files": len(files),
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows_out / seconds, 1) if seconds > 0 else None,
    }


def _predict_and_write(
    spec: BatchJobSpec, settings: Settings, plan: BatchPlan, onnx_model: bytes, job_id: str, report: Reporter
) -> int:
    """The Ray Data pipeline: read -> actor pool of predictors -> write. Returns the input rows."""
    import ray
    from ray.data import ActorPoolStrategy

    batch = settings.batch
    batch_size = spec.batch_size or batch.batch_size
    concurrency = spec.concurrency or batch.concurrency
    io_cpus = batch.io_num_cpus
    if plan.input_format == "parquet":
        rows_total = count_input_rows(plan)
    else:
        rows_total = _read(plan, io_cpus).count()  # CSV has no row count short of reading it
    report({"stage": "predicting", "rows_total": rows_total}, f"{rows_total} input rows")
    # Blocks of up to _BATCHES_PER_BLOCK batches (each block costs scheduling and a hop through
    # the object store), but at least two per predictor so that one file keeps them all busy.
    blocks = min(max(math.ceil(rows_total / (batch_size * _BATCHES_PER_BLOCK)), 2 * concurrency), _MAX_BLOCKS)
    ds = _read(plan, io_cpus, blocks)

    counter = ray.remote(num_cpus=0)(RowCounter).remote()
    ds = ds.map_batches(
        OnnxBatchPredictor,
        fn_constructor_kwargs={
            "onnx_model": onnx_model,
            "feature_columns": plan.feature_columns,
            "keep_columns": plan.keep_columns,
            "probabilities": spec.return_probabilities,
            "classes": model_metadata(plan.model).get("classes"),
            "wide_probabilities": spec.format == "csv",
            "intra_op_threads": batch.onnx_intra_op_threads,
            "counter": counter,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=spec.num_cpus_per_worker or batch.worker_num_cpus,
        num_gpus=spec.num_gpus_per_worker or None,
        udf_modifying_row_count=False,
    )
    writer = ds.write_parquet if plan.output_format == "parquet" else ds.write_csv
    watcher = _ProgressWatcher(counter, rows_total, report, batch.progress_interval_s)
    watcher.start()
    try:
        writer(
            plan.output_path,
            filesystem=plan.output_fs,
            filename_provider=_job_files(job_id, plan.output_format),
            try_create_dir=not is_s3(spec.output_uri),  # S3 has no folders; no empty marker objects
            ray_remote_args={"num_cpus": io_cpus},
            min_rows_per_file=batch.min_rows_per_file,
        )
    except Exception as exc:
        raise _job_error(exc) from None
    finally:
        watcher.stop()
        ray.kill(counter)
    return rows_total


def _job_error(exc: Exception) -> Exception:
    """The MatihError a failed Ray Data execution carries (a bad batch), else the exception."""
    from app.errors import MatihError

    seen = exc
    for _ in range(8):
        if isinstance(seen, MatihError):
            return seen
        nxt = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return exc
