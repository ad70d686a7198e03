"""One monitor run end to end: the ``monitor_run`` job.

1. resolve the version the endpoint serves and load the reference profile (of that version,
   or the monitor's pinned ``reference.version``);
2. read the window of the prediction log with Ray Data (only the hour partitions of the
   window; read and decode tasks of ``monitoring.task_num_cpus``), decode the logged inputs to
   columns, keep the newest rows of a ``{"rows": N}`` window, drop failed requests and
   duplicates (a record caught mid-compaction);
3. drift: the feature columns in groups as Ray tasks against the profile
   (``app.monitoring.drift.dataset_drift_ray``), the predictions against the holdout's, and
   every segment's slice;
4. performance from the feedback join (``app.predlog.join``) and its CBPE estimate;
5. the run's flat outputs -> alert rules (``app.monitoring.alerts``) and retraining policies
   (``app.monitoring.loop``);
6. the run row records all of it (``GET /v1/monitors/{endpoint}/drift``).

Nothing here runs on the request path: monitoring reads the log, after the fact.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.errors import InvalidInput, MatihError
from app.monitoring.spec import MonitorSpec, parse_monitor_spec
from app.monitoring.store import MonitorStore
from app.monitoring.window import as_float, decode_inputs, window_bounds

__all__ = ["run_monitor_job", "MonitorRunner", "RUN_KIND", "outputs_of", "submit_run"]

log = logging.getLogger(__name__)
RUN_KIND = "monitor_run"
_META = ("__request_id", "__instance", "__timestamp", "__variant", "__prediction", "__probabilities", "__model_version")
_TOP_SEGMENT_VALUES = 20


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_job_id(run_id: str) -> str:
    return f"monitor-{run_id}"


def submit_run(store, endpoint: str, *, trigger: str, actor: str, now: datetime | None = None) -> dict[str, Any]:
    """Queue a run of ``endpoint``'s monitor: the run row and its ``monitor_run`` job. The
    caller nudges the JobScheduler."""
    runs = MonitorStore(store)
    monitor = runs.get(endpoint)
    now = now or _now()
    run = runs.create_run(endpoint, trigger=trigger, actor=actor, now=now, spec_version=monitor["spec_version"],
                          job_id_of=run_job_id)
    store.create_job(RUN_KIND, f"monitor-{endpoint}", {"endpoint": endpoint, "run_id": run["id"]}, actor,
                     job_id=run["job_id"])
    return run


def run_monitor_job(spec: dict[str, Any], settings, job_id: str, report) -> dict[str, Any]:
    from app.store import MetadataStore

    store = MetadataStore.from_settings(settings)
    return MonitorRunner(settings, store).run(spec["endpoint"], spec["run_id"], report)


# -- reading the window ------------------------------------------------------------------------------
def _decode_batch(batch: pa.Table, features: list[str], numeric: list[str], extra: list[str]) -> pa.Table:
    """A batch of log rows -> the meta columns (``__`` prefixed) and one column per feature."""
    if "status" in batch.column_names:  # files written before the column existed hold only successes
        status = batch.column("status")
        batch = batch.filter(pc.or_kleene(pc.is_null(status), pc.less(status, 400)))
    wanted = list(dict.fromkeys([*features, *extra]))
    decoded = decode_inputs(batch.column("inputs"), wanted)
    cols: dict[str, Any] = {
        "__request_id": batch.column("request_id"), "__instance": batch.column("instance"),
        "__timestamp": batch.column("timestamp"), "__variant": batch.column("variant"),
        "__prediction": batch.column("prediction"), "__probabilities": batch.column("probabilities"),
        "__model_version": batch.column("model_version"),
    }
    for name in wanted:
        column = decoded.column(name)
        cols[name] = as_float(column) if name in numeric else column
    return pa.table(cols)


def _dedupe(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    keys = pa.table({"r": table.column("__request_id"), "i": table.column("__instance"),
                     "v": table.column("__variant"), "n": pa.array(np.arange(table.num_rows))})
    first = keys.group_by(["r", "i", "v"]).aggregate([("n", "min")]).column("n_min").to_numpy()
    return table.take(np.sort(first))


def read_current(settings, endpoint: str, since: datetime, until: datetime, newest: int | None,
                 features: list[str], numeric: list[str], extra: list[str], *, cap: int | None = None) -> pa.Table:
    """The window as one table (meta columns + features), read and decoded with Ray Data:
    the ``newest`` rows of the range when given, and at most ``cap`` rows (the newest)."""
    import ray.data
    from ray.data.expressions import col, lit

    from app.predlog.layout import SCHEMA
    from app.predlog.query import _filesystem, _partition_paths

    root, fs = _filesystem(settings)
    paths = _partition_paths(fs, root, endpoint, since, until)
    cpus = settings.monitoring.task_num_cpus
    if not paths:
        empty = _decode_batch(SCHEMA.empty_table(), features, numeric, extra)
        return empty
    ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, file_extensions=["parquet"], num_cpus=cpus)
    ds = ds.filter(expr=(col("timestamp") >= lit(since)) & (col("timestamp") < lit(until)))
    ds = ds.map_batches(_decode_batch, batch_format="pyarrow", num_cpus=cpus,
                        fn_kwargs={"features": features, "numeric": numeric, "extra": extra})
    if newest is not None:
        ds = ds.sort("__timestamp", descending=True).limit(newest)
    blocks = ray.get(ds.to_arrow_refs())
    blocks = [b for b in blocks if b.num_rows]
    if not blocks:
        return _decode_batch(SCHEMA.empty_table(), features, numeric, extra)
    table = pa.concat_tables(blocks, promote_options="permissive")
    table = _dedupe(table)
    keep = min(n for n in (newest, cap, table.num_rows) if n is not None)
    if table.num_rows > keep:
        table = table.sort_by([("__timestamp", "descending")]).slice(0, keep)
    return table.sort_by([("__timestamp", "ascending")])


def _prediction_column(table: pa.Table, kind: str) -> pa.Array:
    raw = table.column("__prediction")
    wrapped = pc.binary_join_element_wise("{\"p\":", pc.fill_null(raw, "null"), "}", "")
    values = decode_inputs(wrapped, ["p"]).column("p")
    return as_float(values) if kind == "numeric" else values


# -- the outputs rules and policies read ------------------------------------------------------------
def outputs_of(rows: int, drift: dict | None, prediction: dict | None, segments: dict, performance: dict | None,
               drops: int | None) -> dict[str, Any]:
    """The flat outputs of a run that alert rules and retraining policies are written against:
    ``drift.dataset``, ``drift.share``, ``drift.feature[x]``, ``drift.prediction``,
    ``drift.segment[col=value]``, ``performance.<metric>``, ``estimated.<metric>``,
    ``predlog.drops``, ``rows``, ``labels.rows``."""
    out: dict[str, Any] = {"rows": rows}
    if drift and drift.get("dataset_drift"):
        out["drift.dataset"] = bool(drift["dataset_drift"]["detected"])
        out["drift.share"] = float(drift["dataset_drift"]["share"])
        for name, res in (drift.get("columns") or {}).items():
            if "error" not in res:
                out[f"drift.feature[{name}]"] = bool(res["drifted"])
    if prediction and "error" not in prediction:
        out["drift.prediction"] = bool(prediction["drifted"])
    for column, by_value in (segments or {}).items():
        for value, res in by_value.items():
            if res.get("dataset_drift"):
                out[f"drift.segment[{column}={value}]"] = bool(res["dataset_drift"]["detected"])
    if performance:
        out["labels.rows"] = int(performance.get("labelled_rows") or 0)
        for metric, res in (performance.get("overall") or {}).items():
            if isinstance(res, dict) and res.get("value") is not None:
                out[f"performance.{metric}"] = float(res["value"])
        for metric, res in (performance.get("estimated") or {}).items():
            if isinstance(res, dict) and res.get("value") is not None:
                out[f"estimated.{metric}"] = float(res["value"])
    if drops is not None:
        out["predlog.drops"] = int(drops)
    return out


def _strip_plots(result: dict) -> dict:
    cols = {k: {kk: vv for kk, vv in v.items() if kk != "plot"} for k, v in (result.get("columns") or {}).items()}
    return {**result, "columns": cols}


class MonitorRunner:
    def __init__(self, settings, store, clock=None):
        self.settings = settings
        self.store = store
        self.runs = MonitorStore(store)
        self.clock = clock or _now

    def _resolve(self, target: str) -> tuple[str, str]:
        from app.registry.mlflow_registry import ModelRegistry

        resolved = ModelRegistry(self.settings).resolve(target, use_cache=False)
        return resolved.name, str(resolved.version)

    def _drops(self, endpoint: str) -> tuple[int, int] | None:
        """(records the Gateway replicas dropped for ``endpoint`` since the last run, the
        PredictionLog actor's counter now): the counter counts since the actor started, so a
        counter lower than the last run's means a restart and counts whole. None without a Ray
        cluster or actor (a hand-run job): the output is absent and no rule fires on it."""
        try:
            import ray

            from actors import NAMESPACE
            from actors.prediction_log import ACTOR_NAME

            if not ray.is_initialized():
                return None
            stats = ray.get(ray.get_actor(ACTOR_NAME, namespace=NAMESPACE).stats.remote(endpoint), timeout=10)
        except Exception:  # noqa: BLE001 - see the docstring
            return None
        counter = int(stats.get("dropped") or 0)
        previous = ((self.runs.latest_run(endpoint) or {}).get("outputs") or {}).get("predlog.dropped_counter")
        if previous is None or counter < int(previous):
            return counter, counter
        return counter - int(previous), counter

    def run(self, endpoint: str, run_id: str, report) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return self._run(endpoint, run_id, report, started)
        except Exception as exc:
            message = str(exc) if isinstance(exc, MatihError) else f"{type(exc).__name__}: {exc}"
            self.runs.finish_run(run_id, now=self.clock(), status="failed", error=message[:4000],
                                 keep=self.settings.monitoring.history_runs)
            raise

    def _run(self, endpoint: str, run_id: str, report, started: float) -> dict[str, Any]:
        from app.monitoring.drift import DriftOptions, column_drift, dataset_drift, dataset_drift_ray
        from app.monitoring.reference import load_profile

        monitor = self.runs.get(endpoint)
        spec, alerts_spec, retraining = parse_monitor_spec(monitor["spec"])
        ep = self.store.get_endpoint(endpoint)
        model, served = self._resolve(ep["target"])
        ref_version = spec.reference.version or served
        now = self.clock()
        since, until, newest = window_bounds(spec.window.model_dump(exclude_none=True), now)
        self.runs.start_run(run_id, now=now, model=model, model_version=ref_version, since=since, until=until)
        report({"stage": "profile", "model": model, "version": ref_version}, f"reference profile of {model}/{ref_version}")
        profile = load_profile(self.settings, model, ref_version)
        features = list(spec.features or list(profile.get("features") or {}))
        unknown = [f for f in features if f not in (profile.get("features") or {})]
        if unknown:
            raise InvalidInput(f"the monitor names features the reference profile of {model}/{ref_version} does "
                               f"not have: {unknown[:10]}", details={"field": "features"})
        categorical = set(spec.categorical)
        numeric = [f for f in features if profile["features"][f]["kind"] == "numeric" and f not in categorical]
        extra = [s for s in spec.segments if s != "variant" and s not in features]
        report({"stage": "reading"}, f"reading {endpoint}'s log from {since.isoformat()} to {until.isoformat()}")
        cap = self.settings.monitoring.max_window_rows
        table = read_current(self.settings, endpoint, since, until, spec.window.rows, features, numeric, extra,
                             cap=cap)
        rows = table.num_rows
        report({"stage": "testing", "rows": rows, "columns": len(features)}, f"{rows} rows x {len(features)} columns")
        options = DriftOptions(columns=features, tests={} if spec.tests == "auto" else dict(spec.tests),
                               default_test=spec.default_test, thresholds=dict(spec.thresholds),
                               correction=spec.correction, drift_share=spec.drift_share)
        drift = prediction = None
        segments: dict[str, dict] = {}
        note = None
        if rows < spec.min_rows:
            note = f"{rows} logged rows in the window, fewer than min_rows ({spec.min_rows}): no drift verdict"
        else:
            mon = self.settings.monitoring
            drift = dataset_drift_ray(profile, table.select(features), options, num_cpus=mon.task_num_cpus,
                                      columns_per_task=mon.columns_per_task)
            if spec.prediction_drift and profile.get("prediction"):
                kind = profile["prediction"]["kind"]
                values = _prediction_column(table, kind)
                prediction = column_drift("prediction", profile["prediction"], values, None, None)
            for seg in spec.segments:
                column = table.column("__variant" if seg == "variant" else seg)
                counts = pc.value_counts(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
                pairs = sorted(((c["values"].as_py(), c["counts"].as_py()) for c in counts if c["values"].is_valid),
                               key=lambda p: -p[1])[:_TOP_SEGMENT_VALUES]
                segments[seg] = {}
                for value, count in pairs:
                    if count < spec.min_rows:
                        continue
                    part = table.filter(pc.equal(column, pa.scalar(value, column.type)))
                    segments[seg][str(value)] = _strip_plots(dataset_drift(profile, part.select(features), options))
        performance = None
        if spec.performance.enabled and rows:
            performance = self._performance(endpoint, table, profile, spec, since, until)
        drops = self._drops(endpoint)
        outputs = outputs_of(rows, drift, prediction, segments, performance, drops[0] if drops else None)
        if drops is not None:
            outputs["predlog.dropped_counter"] = drops[1]
        report({"stage": "alerts"}, "alert rules and retraining policies")
        alerts = self._alerts(endpoint, run_id, alerts_spec, outputs)
        triggers = self._retraining(endpoint, run_id, retraining, outputs)
        record = dict(drift or {})
        record.update({"prediction_drift": prediction, "segments": segments, "alerts": alerts, "triggers": triggers,
                       "outputs": outputs, "note": note, "seconds": round(time.monotonic() - started, 3)})
        out = self.runs.finish_run(run_id, now=self.clock(), status="succeeded", rows=rows, drift=record,
                                   performance=performance, keep=self.settings.monitoring.history_runs)
        report({"stage": "done", "rows": rows}, "drift: " + (
            json.dumps(drift["dataset_drift"]) if drift else (note or "none")))
        return {"run_id": run_id, "endpoint": endpoint, "rows": rows, "dataset_drift": out.get("dataset_drift"),
                "alerts": [a.get("id") for a in alerts], "triggers": [t.get("id") for t in triggers]}

    def _performance(self, endpoint: str, table: pa.Table, profile: dict, spec: MonitorSpec, since, until):
        from app.monitoring.performance import performance_report
        from app.predlog.join import join_feedback, window_feedback

        holdout = profile.get("holdout") or {}
        task = holdout.get("task") or ("classification" if (profile.get("prediction") or {}).get("kind") != "numeric"
                                       else "regression")
        cols = {"request_id": table.column("__request_id"), "instance": table.column("__instance"),
                "timestamp": table.column("__timestamp"), "variant": table.column("__variant"),
                "prediction": table.column("__prediction"), "probabilities": table.column("__probabilities")}
        segment_cols = []
        for seg in spec.segments:
            if seg == "variant":
                segment_cols.append("variant")
                continue
            cols[seg] = table.column(seg).cast(pa.string())
            segment_cols.append(seg)
        predictions = pa.table(cols)
        feedback = window_feedback(self.store, endpoint, since, until)
        joined = join_feedback(predictions, feedback, how="left")
        return performance_report(joined, task=task, classes=holdout.get("classes"),
                                  calibration=holdout or None, segments=segment_cols,
                                  bucket_s=spec.performance.bucket_s, confidence=spec.performance.confidence)

    def _alerts(self, endpoint: str, run_id: str, alerts_spec, outputs: dict) -> list[dict]:
        from app.monitoring.alerts import AlertService

        return AlertService(self.store, self.settings, clock=self.clock).process(endpoint, run_id, alerts_spec, outputs)

    def _retraining(self, endpoint: str, run_id: str, retraining, outputs: dict) -> list[dict]:
        if retraining is None or not retraining.enabled:
            return []
        from app.monitoring.loop import RetrainLoop
        from app.registry.mlflow_registry import ModelRegistry
        from app.registry.service import RegistryService

        registry = RegistryService(self.settings, ModelRegistry(self.settings), self.store)
        return RetrainLoop(self.store, self.settings, registry, clock=self.clock).evaluate(
            endpoint, retraining, outputs, run_id, self.clock())
