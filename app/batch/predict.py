"""Batch prediction with Ray Data: read parquet or CSV (local or S3), run an actor pool of ONNX
Runtime predictors over batches, write parquet or CSV with exactly one row per input row.

:func:`plan_batch` checks a request against the model and the input before anything runs
(the API calls it at submit time, the job again when it starts); :func:`run_batch_prediction`
is the job itself, executed by ``app.jobs.runner`` inside the Ray task the JobScheduler
launches. :class:`~app.batch.predictor.OnnxBatchPredictor` is plain Python over pyarrow
tables, so it is tested without Ray; Ray Data runs one instance per actor.

Order: Ray Data runs with ``preserve_order``, so the predicted blocks reach the job in input
order; the job writes them into files named ``part-<job>-<n>``, and reading them in name
order gives the input order. A ``key_column`` carries the user's own key as well.

Fixed cost: a job pays for its predictor actors (a process each, which imports Ray Data and
ONNX Runtime), for Ray Data's planning and for its read tasks; it writes the output itself
(see :class:`_OutputWriter`). The job times the
model on a sample of the input before it starts the pool, and sizes the pool and the blocks
from that: a job with little model work gets one predictor instead of ``concurrency``
(unless the request names a concurrency), and blocks hold about :data:`_BLOCK_SECONDS` of
model work, so that the predictors finish together.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.batch.predictor import OnnxBatchPredictor
from app.batch.spec import BatchJobSpec
from app.errors import Conflict, DependencyUnavailable, InvalidInput, ModelError, NotFound
from app.registry.mlflow_registry import ModelRegistry, ResolvedModel, check_servable, model_metadata
from app.settings import Settings
from app.storage.s3 import configure_s3_env, is_s3, resolve_uri

__all__ = ["BatchPlan", "OnnxBatchPredictor", "plan_batch", "run_batch_prediction"]

log = logging.getLogger(__name__)
Reporter = Callable[[dict[str, Any], str | None], None]
_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_BATCHES_PER_BLOCK = 16  # most batches in a block (predictors iterate them inside one call)
_MIN_BATCHES_PER_BLOCK = 2  # fewest: each block is a task, a hop through the object store and a scheduling turn
_MAX_BLOCKS = 2000
_BLOCK_SECONDS = 0.5  # model work per block: small enough that the predictors finish together
_SECONDS_PER_PREDICTOR = 1.0  # less model work than this per extra predictor: it would cost more to start
_SAMPLE_ROWS = 2048  # input rows the driver times the model on before it starts the pool
_TASKS_IN_FLIGHT_PER_PREDICTOR = 2  # one running, one waiting: no gap between blocks, no long queue
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
            f"input_uri {uri!r} cannot be read as {fmt}: {_summarize(exc)}", details={"field": "input_uri"}
        ) from None


def _summarize(exc: Exception) -> str:
    """pyarrow's message without the file's content: a CSV parse error ends with the row it
    could not parse, which is not the caller's to read back."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    if "CSV parse error" in text:
        text = text[text.index("CSV parse error"):]
    text = re.sub(r"(CSV parse error: (?:Row #\d+: )?[^:]*): .*$", r"\1", text)
    return text[:500]


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


# -- output files ----------------------------------------------------------------------------
def file_prefix(job_id: str) -> str:
    return f"part-{job_id[:12]}-"


def file_name(job_id: str, index: int, fmt: str) -> str:
    """Name of a job's ``index``-th output file; name order is row order."""
    return f"{file_prefix(job_id)}{index:06d}.{fmt}"


class _OutputWriter:
    """Writes a job's predicted blocks, in the order they come, into files of at least
    ``min_rows`` rows (the last may be smaller) named so that name order is row order.

    The job writes from its own process rather than through Ray Data write tasks: on a small
    node every write task tends to start a fresh worker process (idle workers are reaped after
    about a second when the predictors hold the node's worker slots), and each such process
    imports Ray Data again, which costs more CPU than writing the rows. The output of a batch
    prediction (key, prediction, probabilities) is small next to the model work behind it.
    """

    def __init__(self, plan: BatchPlan, job_id: str, min_rows: int, uri: str):
        self.plan, self.job_id, self.min_rows, self.uri = plan, job_id, min_rows, uri
        self.index = 0
        self.rows = 0  # in the open file
        self.sink = self.writer = None
        self.schema = None

    def _open(self, schema) -> None:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        path = posixpath.join(self.plan.output_path, file_name(self.job_id, self.index, self.plan.output_format))
        self.sink = _fs_call(self.uri, lambda: self.plan.output_fs.open_output_stream(path))
        if self.plan.output_format == "parquet":
            self.writer = pq.ParquetWriter(self.sink, schema)
        else:
            self.writer = pacsv.CSVWriter(self.sink, schema)
        self.schema = schema

    def _close(self) -> None:
        if self.writer is not None:
            writer, sink = self.writer, self.sink
            self.writer = self.sink = None
            writer.close()
            _fs_call(self.uri, sink.close)
            self.index += 1
            self.rows = 0

    def write(self, table) -> None:
        if table.num_rows == 0:
            return
        if self.writer is not None and not table.schema.equals(self.schema):
            try:  # CSV input: a later block may infer int where an earlier one had float
                table = table.cast(self.schema)
            except Exception:  # noqa: BLE001 - a different schema starts a new file instead
                self._close()
        if self.writer is None:
            self._open(table.schema)
        _fs_call(self.uri, lambda: self.writer.write_table(table))
        self.rows += table.num_rows
        if self.rows >= self.min_rows:
            self._close()

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        """Close what is open without raising: the job is failing for another reason."""
        try:
            self._close()
        except Exception:  # noqa: BLE001
            log.debug("closing the output after a failure failed", exc_info=True)


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


def _columns(plan: BatchPlan) -> list[str]:
    return list(dict.fromkeys(plan.keep_columns + plan.feature_columns))


def _read_csv(plan: BatchPlan, num_cpus: float, blocks: int | None = None):
    """A CSV input as a Ray Data dataset of just the needed columns; every read task asks for
    ``num_cpus``."""
    import pyarrow.csv as pacsv
    import ray.data

    kwargs: dict[str, Any] = {"filesystem": plan.input_fs, "num_cpus": num_cpus}
    if blocks:
        kwargs["override_num_blocks"] = blocks
    return ray.data.read_csv(
        plan.input_path, convert_options=pacsv.ConvertOptions(include_columns=_columns(plan)), **kwargs
    )


def _read_parquet(plan: BatchPlan, groups, schema, blocks: int, remote_args: dict[str, Any]):
    """A parquet input as ``blocks`` contiguous row ranges of just the needed columns. The read
    tasks ask for the predictors' resources (``remote_args``), which lets Ray Data fuse them
    into the predictor actors (see app/batch/_parquet.py)."""
    import pyarrow as pa
    import ray.data

    from app.batch._parquet import ParquetRowRanges

    columns = _columns(plan)
    projected = pa.schema([schema.field(c) for c in columns])
    row_bytes = sum(max(1, f.type.byte_width if pa.types.is_primitive(f.type) else 16) for f in projected)
    source = ParquetRowRanges(groups, plan.input_fs, columns, projected, row_bytes)
    return ray.data.read_datasource(source, override_num_blocks=blocks, ray_remote_args=dict(remote_args))


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

    from app.batch._parquet import parquet_row_groups

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
        f"batch prediction with {model.model_id}: {spec.input_uri} -> {spec.output_uri} ({spec.format})",
    )
    # Fail fast on a model that cannot take these columns, before any actor starts; and time it
    # on the first input rows, to size the pool and the blocks.
    groups = schema = None
    if plan.input_format == "parquet":  # the row-group layout, from the footers: read once, used twice
        groups, schema = _fs_call(spec.input_uri, lambda: parquet_row_groups(plan.input_path, plan.input_fs))
    probe = OnnxBatchPredictor(onnx_model, plan.feature_columns, plan.keep_columns)
    seconds_per_row = _seconds_per_row(probe, _sample(plan, groups))
    del probe

    with DataContext.current(_data_context(settings)):
        rows_total = _predict_and_write(
            spec, settings, plan, onnx_model, seconds_per_row, job_id, report, (groups, schema)
        )

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


def _sample(plan: BatchPlan, groups: list | None = None, rows: int = _SAMPLE_ROWS):
    """The first ``rows`` input rows (feature columns only), or None when they cannot be read
    cheaply; the job then runs without a timing and sizes by its settings alone. For parquet,
    ``groups`` (``parquet_row_groups``) says where they are, so no footer is read again."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from app.batch._parquet import read_range

    try:
        if groups is not None:
            stop = min(rows, sum(g.rows for g in groups))
            head = [g for g in groups if g.start < stop]  # the row groups the first rows are in
            tables = list(read_range(plan.input_fs, head, 0, stop, plan.feature_columns))
            return pa.concat_tables(tables) if tables else None
        dataset = pads.dataset(plan.input_path, filesystem=plan.input_fs, format=plan.input_format)
        return dataset.head(rows, columns=plan.feature_columns)
    except Exception:  # noqa: BLE001 - sizing is an optimisation; the pipeline reports real read errors
        log.debug("could not sample the input", exc_info=True)
        return None


def _seconds_per_row(predictor: OnnxBatchPredictor, sample) -> float | None:
    """Model time per row on ``sample``, measured after one small warm-up call. A sample the
    model refuses (empty values, say) fails the job here, with the message a predictor would give."""
    if sample is None or sample.num_rows == 0:
        return None
    predictor.predict(sample.slice(0, 16))
    t0 = time.perf_counter()
    predictor.predict(sample)
    return (time.perf_counter() - t0) / sample.num_rows


def size_pipeline(
    rows_total: int, seconds_per_row: float | None, batch_size: int, concurrency: int, *, fixed: bool
) -> tuple[int, int]:
    """(predictor actors, input blocks) for a job.

    Each predictor is a process that imports Ray Data and opens a session (about a second of
    CPU), so a job whose whole model work is short gets fewer predictors than ``concurrency``
    (never fewer than one, and exactly ``concurrency`` when the request named it: ``fixed``).
    Blocks carry about ``_BLOCK_SECONDS`` of model work (1 to ``_BATCHES_PER_BLOCK`` batches),
    and there are at least two per predictor, so that no predictor is left with a long last block
    while the others wait. Without a timing: ``concurrency`` predictors, blocks of
    ``_BATCHES_PER_BLOCK`` batches.
    """
    predictors = concurrency
    batches_per_block = _BATCHES_PER_BLOCK
    if seconds_per_row is not None and seconds_per_row > 0:
        work = seconds_per_row * rows_total
        if not fixed:
            predictors = min(concurrency, max(1, int(work // _SECONDS_PER_PREDICTOR)))
        batches_per_block = min(
            _BATCHES_PER_BLOCK, max(_MIN_BATCHES_PER_BLOCK, round(_BLOCK_SECONDS / (seconds_per_row * batch_size)))
        )
    blocks = max(math.ceil(rows_total / (batch_size * batches_per_block)), 2 * predictors)
    return predictors, max(1, min(blocks, _MAX_BLOCKS, rows_total))


def _predict_and_write(
    spec: BatchJobSpec,
    settings: Settings,
    plan: BatchPlan,
    onnx_model: bytes,
    seconds_per_row: float | None,
    job_id: str,
    report: Reporter,
    layout: tuple[list | None, Any],
) -> int:
    """The pipeline: Ray Data reads and runs the actor pool of predictors; the predicted blocks
    stream back in order and are written here, with progress. ``layout``: a parquet input's
    (row groups, schema). Returns the input rows."""
    import ray
    from ray.data import ActorPoolStrategy

    batch = settings.batch
    batch_size = spec.batch_size or batch.batch_size
    io_cpus = batch.io_num_cpus
    groups, schema = layout
    if plan.input_format == "parquet":
        rows_total = sum(g.rows for g in groups)  # from the footers: no data read
    else:
        rows_total = _read_csv(plan, io_cpus).count()  # CSV has no row count short of reading it
    predictors, blocks = size_pipeline(
        rows_total,
        seconds_per_row,
        batch_size,
        spec.concurrency or batch.concurrency,
        fixed=spec.concurrency is not None,
    )
    timing = f", model {seconds_per_row * 1e6:.2f} us/row" if seconds_per_row else ""
    report(
        {"stage": "predicting", "rows_total": rows_total},
        f"{rows_total} input rows in {blocks} block(s); {predictors} predictor(s) x {batch_size} rows{timing}",
    )
    remote_args = {"num_cpus": spec.num_cpus_per_worker or batch.worker_num_cpus}
    if spec.num_gpus_per_worker:
        remote_args["num_gpus"] = spec.num_gpus_per_worker
    if plan.input_format == "parquet":
        ds = _read_parquet(plan, groups, schema, blocks, remote_args)
    else:
        ds = _read_csv(plan, io_cpus, blocks)
    ds = ds.map_batches(
        OnnxBatchPredictor,
        fn_constructor_kwargs={
            "onnx_model": ray.put(onnx_model),  # once in the object store; each actor maps it from there
            "feature_columns": plan.feature_columns,
            "keep_columns": plan.keep_columns,
            "probabilities": spec.return_probabilities,
            "classes": model_metadata(plan.model).get("classes"),
            "wide_probabilities": spec.format == "csv",
            "intra_op_threads": batch.onnx_intra_op_threads,
            "batch_size": batch_size,  # rows per ONNX Runtime call; Ray Data hands over whole blocks
        },
        batch_size=None,  # (a batch_size here would keep Ray Data from fusing the read into the actors)
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=predictors, max_tasks_in_flight_per_actor=_TASKS_IN_FLIGHT_PER_PREDICTOR),
        udf_modifying_row_count=False,
        **remote_args,
    )
    if not is_s3(spec.output_uri):  # S3 has no folders; no empty marker objects
        _fs_call(spec.output_uri, lambda: plan.output_fs.create_dir(plan.output_path, recursive=True))
    out = _OutputWriter(plan, job_id, batch.min_rows_per_file, spec.output_uri)
    rows_done, reported = 0, time.monotonic()
    try:
        # preserve_order: blocks come in input order, so files and rows within them keep it.
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            out.write(table)
            rows_done += table.num_rows
            if time.monotonic() - reported >= batch.progress_interval_s:
                report({"rows_done": min(rows_done, rows_total)}, None)
                reported = time.monotonic()
        out.close()
    except Exception as exc:
        out.abort()
        raise _job_error(exc) from None
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
