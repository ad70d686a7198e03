"""Feature store jobs: materialization into the online store and point-in-time training sets.

Both run as jobs of the one job system (kinds ``feature_materialize`` and ``feature_historical``,
``app/jobs/runner.py``), so progress and results show on ``GET /v1/jobs/{id}``. In a job the
process is a Ray Job of the platform's cluster (``app/jobs/run.py`` connects to it first), so
Feast's Ray compute engine finds Ray initialised and runs its tasks in that cluster: it never
starts a second one.

Rows written: Feast's ``materialize`` returns no counts. Before each view is materialized, its
source is read for the window (the join keys and the event timestamp only, for a parquet
``FileSource``; through the offline store's ``pull_latest_from_table_or_query`` otherwise): the
job reports ``source_rows`` (rows in the window) and ``rows_written`` (distinct entity keys in
the window: Feast writes the latest row of each one to the online store). With the Ray compute engine the
counted window starts no earlier than now - ttl: that engine drops older rows when it writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlsplit

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.errors import InvalidInput, NotFound
from app.settings import Settings

log = logging.getLogger(__name__)

Reporter = Callable[..., None]
MATERIALIZE_KIND = "feature_materialize"
HISTORICAL_KIND = "feature_historical"
FEAST_SCHEME = "feast://"
_ROW = "__matih_row"  # the entity row's position, through Feast's join and back
#: The CPUs the Ray compute engine's Ray Data tasks may hold at once, as a share of the job's
#: reservation (jobs.num_cpus); see _limit_ray_data. A setting would live in FeatureSettings.
RAY_DATA_CPU_SHARE = 1.0


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MaterializeSpec(_Strict):
    """``{views?, start, end}`` (a window) or ``{views?, end?, incremental: true}``."""

    views: list[str] | None = Field(None, description="Feature views to materialize; default: every view.")
    start: datetime | None = Field(None, description="Window start (UTC when no zone is given).")
    end: datetime | None = Field(None, description="Window end; with incremental, default now.")
    incremental: bool = Field(False, description="From each view's last materialized end (or now - ttl) to end.")
    name: str | None = Field(None, max_length=200, description="Job name; default materialize-<views>.")

    @field_validator("start", "end")
    @classmethod
    def _zone(cls, v: datetime | None) -> datetime | None:
        return _utc(v)

    @model_validator(mode="after")
    def _window(self) -> MaterializeSpec:
        if self.incremental:
            if self.start is not None:
                raise InvalidInput("start and incremental exclude each other: incremental starts where the last "
                                   "materialization ended", details={"field": "start"})
        else:
            for key in ("start", "end"):
                if getattr(self, key) is None:
                    raise InvalidInput(f"{key} is required unless incremental is true", details={"field": key})
        if self.start is not None and self.end is not None and not self.start < self.end:
            raise InvalidInput(f"start ({self.start.isoformat()}) must be before end ({self.end.isoformat()})",
                               details={"field": "start"})
        if self.views is not None and len(set(self.views)) != len(self.views):
            raise InvalidInput("views names a feature view twice", details={"field": "views"})
        return self


class HistoricalSpec(_Strict):
    feature_service: str = Field(..., min_length=1, description="Feature service whose features make the set.")
    entities: str = Field(..., description="Parquet of entity keys and an event_timestamp column (the label time).")
    output: str | None = Field(None, description="Parquet to write; default MATIH_HOME/data/features/historical/"
                               "<job id>.parquet.")
    full_feature_names: bool = Field(False, description="Name columns view__feature instead of feature.")
    name: str | None = Field(None, max_length=200, description="Job name; default historical-<service>.")


def model_error(exc) -> InvalidInput:
    """A pydantic ValidationError of a spec as InvalidInput naming the first field."""
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidInput):
        return cause
    field = ".".join(str(p) for p in err["loc"]) or "spec"
    return InvalidInput(f"{field}: {err['msg']}", details={"field": field})


def parse_spec(model, data: dict[str, Any]):
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise model_error(exc) from None


# -- paths -------------------------------------------------------------------------------------

def default_output(settings: Settings, job_id: str) -> str:
    return str(Path(settings.matih_home) / "data" / "features" / "historical" / f"{job_id}.parquet")


def check_historical_paths(spec: HistoricalSpec, settings: Settings) -> HistoricalSpec:
    """``entities`` and ``output`` inside the data roots (422 naming the field), made canonical."""
    from app.storage.paths import check_job_location

    update = {"entities": check_job_location(spec.entities, settings, "entities", must_exist=True)}
    if spec.output is not None:
        if spec.output.startswith(("s3://", "s3a://")):
            raise InvalidInput("output: a local parquet path (object stores are not written yet)",
                               details={"field": "output"})
        update["output"] = check_job_location(spec.output, settings, "output")
    return spec.model_copy(update=update)


def check_views(store, views: list[str] | None) -> list[str]:
    """The views to materialize (every feature view when None); 422 naming ``views`` for unknown ones."""
    known = [fv.name for fv in store.list_feature_views()]
    if views is None:
        if not known:
            raise InvalidInput(f"project {store.project!r} has no feature views to materialize",
                               details={"field": "views"})
        return known
    unknown = [v for v in views if v not in known]
    if unknown:
        raise InvalidInput(f"unknown feature view(s) {', '.join(unknown)} in project {store.project!r}; "
                           f"known: {', '.join(known) or 'none'}", details={"field": "views"})
    return list(views)


def check_feature_service(store, name: str, field: str = "feature_service"):
    from feast.errors import FeatureServiceNotFoundException

    try:
        return store.get_feature_service(name, allow_cache=False)
    except FeatureServiceNotFoundException:
        raise NotFound(f"feature service {name!r} does not exist in project {store.project!r}",
                       details={"field": field}) from None


# -- the store a job uses ----------------------------------------------------------------------

def _limit_ray_data(settings: Settings) -> None:
    """Keep the Ray compute engine's Ray Data tasks within the job's share of the cluster.

    Feast's read and write nodes call ``map_batches`` without ``num_cpus``: each task asks Ray
    for 1 CPU. The job's driver reserves none (``app/jobs/resources.py``: it mostly waits) and
    the scheduler admitted the job with ``jobs.num_cpus`` free, so the tasks run in that room;
    Ray Data's resource limit keeps one job from taking more (at least 1 CPU, what one task asks)."""
    import ray

    if not ray.is_initialized():
        return
    from ray.data import DataContext, ExecutionResources

    cpus = max(1.0, settings.jobs.num_cpus * RAY_DATA_CPU_SHARE)
    ctx = DataContext.get_current()
    ctx.execution_options.resource_limits = ExecutionResources(cpu=cpus)
    ctx.enable_progress_bars = False


def job_store(settings: Settings):
    """The FeatureStore of a job (the process's shared one)."""
    from app.features.repo import open_store

    if settings.features.engine == "ray":
        _limit_ray_data(settings)
    return open_store(settings)


# -- materialization ---------------------------------------------------------------------------

def _window_counts(store, fv, start: datetime, end: datetime) -> tuple[int, int]:
    """(rows in [start, end) of the view's source, distinct entity keys among them)."""
    from feast.infra.offline_stores.file_source import FileSource

    source = fv.batch_source
    keys = [store.get_entity(e).join_key for e in fv.entities if e != "__dummy"] if fv.entities else []
    keys = [(source.field_mapping or {}).get(k, k) for k in keys]
    reverse = {v: k for k, v in (source.field_mapping or {}).items()}
    keys = [reverse.get(k, k) for k in keys]
    ts = source.timestamp_field
    if isinstance(source, FileSource) and not source.path.startswith(("s3://", "gs://")):
        import pyarrow.dataset as pads

        ds = pads.dataset(source.path, format="parquet")
        col = pads.field(ts)
        table = ds.to_table(columns=[*keys, ts], filter=(col >= pd.Timestamp(start)) & (col < pd.Timestamp(end)))
        rows = table.num_rows
        distinct = table.select(keys).group_by(keys).aggregate([]).num_rows if keys and rows else min(rows, 1)
        return rows, distinct
    provider = store._get_provider()
    job = provider.offline_store.pull_latest_from_table_or_query(
        config=store.config, data_source=source, join_key_columns=keys,
        feature_name_columns=[f.name for f in fv.features], timestamp_field=ts,
        created_timestamp_column=source.created_timestamp_column or None, start_date=start, end_date=end,
    )
    n = job.to_arrow().num_rows
    return n, n


def _written_from(engine: str, fv, start: datetime) -> datetime:
    """Where the rows the engine writes begin: Feast's Ray compute engine also drops rows older
    than now - ttl (its filter node, at write time); the local engine writes the whole window."""
    if engine == "ray" and fv.ttl and fv.ttl.total_seconds() > 0:
        return max(start, datetime.now(timezone.utc) - fv.ttl)
    return start


def run_materialize(spec: MaterializeSpec, settings: Settings, job_id: str, report: Reporter) -> dict[str, Any]:
    """Materialize each view (one Feast call per view, so progress is per view) with the
    configured engine; the result: ``{engine, window, views: {name: {start, end, source_rows,
    rows_written, seconds}}, rows_written, source_rows, seconds}``."""
    store = job_store(settings)
    views = check_views(store, spec.views)
    end = spec.end or datetime.now(timezone.utc)
    engine = settings.features.engine
    report({"views_done": 0, "views_total": len(views), "rows_written": 0},
           f"materializing {len(views)} view(s) of project {store.project!r} with the {engine} engine"
           + (" (incremental)" if spec.incremental else f" from {spec.start.isoformat()}") + f" to {end.isoformat()}")
    out: dict[str, dict[str, Any]] = {}
    total = rows_total = 0
    began = time.monotonic()
    for i, name in enumerate(views, 1):
        fv = store.get_feature_view(name, allow_registry_cache=False)
        if spec.incremental:
            start = fv.most_recent_end_time
            if start is None:
                if not fv.ttl:
                    raise InvalidInput(f"feature view {name!r} has no ttl and was never materialized: give a "
                                       "start and end for its first materialization", details={"field": "incremental"})
                start = end - fv.ttl
            start = _utc(start)
        else:
            start = spec.start
        t0 = time.monotonic()
        if start >= end:
            rows = written = 0
        else:
            rows, written = _window_counts(store, fv, _written_from(engine, fv, start), end)
            if spec.incremental:
                store.materialize_incremental(end_date=end, feature_views=[name])
            else:
                store.materialize(start_date=start, end_date=end, feature_views=[name])
        took = time.monotonic() - t0
        total += written
        rows_total += rows
        out[name] = {"start": start.isoformat(), "end": end.isoformat(), "source_rows": rows,
                     "rows_written": written, "seconds": round(took, 3)}
        report({"views_done": i, "views_total": len(views), "rows_written": total},
               f"{name}: {written} entity rows written ({rows} source rows in the window) in {took:.1f}s")
    return {"engine": engine, "project": store.project, "incremental": spec.incremental,
            "window": {"start": spec.start.isoformat() if spec.start else None, "end": end.isoformat()},
            "views": out, "rows_written": total, "source_rows": rows_total,
            "seconds": round(time.monotonic() - began, 3)}


# -- point-in-time sets ------------------------------------------------------------------------

def read_entities(uri: str, settings: Settings) -> pd.DataFrame:
    if uri.startswith(("s3://", "s3a://")):
        from app.datasets import _load_s3

        frame = _load_s3(uri, settings)
    else:
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        if not path.exists():
            raise NotFound(f"entities {uri!r} does not exist", details={"field": "entities"})
        frame = pd.read_parquet(path)
    if "event_timestamp" not in frame.columns:
        raise InvalidInput(f"entities {uri!r} has no event_timestamp column (the time of each row's label); "
                           f"columns: {', '.join(map(str, frame.columns))}", details={"field": "entities"})
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    return frame


def service_refs(service) -> list[str]:
    """``view:feature`` of every feature of a feature service, in its order."""
    return [f"{p.name_to_use()}:{f.name}" for p in service.feature_view_projections for f in p.features]


def service_lineage(store, service) -> dict[str, Any]:
    """What a model's lineage records of the feature service it was trained on.

    Feast 0.67 versions feature *views* (``current_version_number``), not services: ``version``
    is ``sha256:<12 hex of the service's spec proto>@<its last_updated_timestamp>`` and
    ``view_versions`` names each view's version number (None: unversioned)."""
    spec = service.to_proto().spec
    digest = hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()[:12]
    updated = service.last_updated_timestamp or service.created_timestamp
    updated_s = _utc(updated).isoformat() if updated else "unknown"
    view_versions = {}
    for p in service.feature_view_projections:
        try:
            fv = store.get_feature_view(p.name, allow_registry_cache=True)
            view_versions[p.name] = getattr(fv, "current_version_number", None)
        except Exception:  # an on-demand or stream view: no version number here
            view_versions[p.name] = None
    return {"name": service.name, "project": store.project, "version": f"sha256:{digest}@{updated_s}",
            "features": service_refs(service), "view_versions": view_versions}


def point_in_time_frame(store, service, entities: pd.DataFrame, full_feature_names: bool = False) -> pd.DataFrame:
    """Feast's point-in-time join: for each entity row, each view's latest value at or before
    its event_timestamp and within the view's ttl (else null). One row per entity row, in the
    entity frame's order: Feast's file (dask) offline store drops an entity row whose only
    feature rows all lie outside the ttl; it comes back here with null features."""
    entities = entities.reset_index(drop=True).copy()
    entities[_ROW] = range(len(entities))
    job = store.get_historical_features(entity_df=entities, features=service, full_feature_names=full_feature_names)
    joined = job.to_df()
    features = [c for c in joined.columns if c not in entities.columns]
    frame = entities.merge(joined[[_ROW, *features]], on=_ROW, how="left", validate="one_to_one")
    return frame.sort_values(_ROW).drop(columns=[_ROW]).reset_index(drop=True)


def run_historical(spec: HistoricalSpec, settings: Settings, job_id: str, report: Reporter) -> dict[str, Any]:
    """Write the point-in-time set of ``spec`` as parquet; the result: ``{output, rows, columns,
    feature_service: {name, version, features, ...}, seconds}``."""
    store = job_store(settings)
    service = check_feature_service(store, spec.feature_service)
    entities = read_entities(spec.entities, settings)
    report({"rows_total": len(entities), "rows_done": 0},
           f"point-in-time join of {len(entities)} entity rows with feature service {service.name!r}")
    t0 = time.monotonic()
    frame = point_in_time_frame(store, service, entities, spec.full_feature_names)
    output = spec.output or default_output(settings, job_id)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output}.{uuid.uuid4().hex[:8]}.tmp"
    frame.to_parquet(tmp, index=False)
    Path(tmp).replace(output)
    report({"rows_total": len(entities), "rows_done": len(frame)}, f"wrote {len(frame)} rows to {output}")
    return {"output": output, "rows": int(len(frame)), "columns": [str(c) for c in frame.columns],
            "feature_service": service_lineage(store, service), "seconds": round(time.monotonic() - t0, 3)}


# -- feast:// training datasets ----------------------------------------------------------------

def parse_feast_uri(uri: str) -> tuple[str, str]:
    """``feast://<service>?entities=<uri>`` -> (service, entities uri)."""
    parts = urlsplit(uri)
    service = parts.netloc or parts.path.strip("/")
    entities = (parse_qs(parts.query).get("entities") or [""])[0]
    if not service or not entities:
        raise InvalidInput(f"dataset {uri!r}: use feast://<feature_service>?entities=<parquet uri>",
                           details={"field": "dataset.uri"})
    return service, entities


def feast_uri(service: str, entities: str) -> str:
    return f"{FEAST_SCHEME}{service}?entities={quote(entities, safe='/:')}"


def check_feast_uri(uri: str, settings: Settings) -> str:
    """The feast:// URI with its entities inside the data roots, canonical (422 naming dataset.uri)."""
    from app.storage.paths import check_job_location

    service, entities = parse_feast_uri(uri)
    return feast_uri(service, check_job_location(entities, settings, "dataset.uri"))


def load_feast_dataset(uri: str, settings: Settings, keep: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """A training frame from ``feast://<service>?entities=<uri>``: the point-in-time set without
    the entity keys and timestamps (not model inputs unless ``keep`` names them), and the
    feature service's lineage record."""
    service_name, entities_uri = parse_feast_uri(uri)
    store = job_store(settings)
    service = check_feature_service(store, service_name, field="dataset.uri")
    entities = read_entities(entities_uri, settings)
    frame = point_in_time_frame(store, service, entities)
    join_keys = set()
    for p in service.feature_view_projections:
        try:
            fv = store.get_feature_view(p.name)
        except Exception:
            continue
        join_keys.update(p.join_key_map.get(c.name, c.name) for c in fv.entity_columns)
    drop = (join_keys | {"event_timestamp", "created", "created_timestamp"}) - set(keep or [])
    frame = frame.drop(columns=[c for c in frame.columns if c in drop])
    return frame.reset_index(drop=True), service_lineage(store, service)


def lineage_json(record: dict[str, Any], limit: int = 4900) -> str:
    """The lineage record as a tag value (MLflow keeps 5000 characters): past ``limit``, the
    view versions go first, then the feature list is cut (``features_total`` says how many)."""
    text = json.dumps(record, separators=(",", ":"), sort_keys=True)
    if len(text) <= limit:
        return text
    record = {**record, "view_versions": None, "features_total": len(record.get("features") or [])}
    features = list(record.get("features") or [])
    while features:
        text = json.dumps({**record, "features": features}, separators=(",", ":"), sort_keys=True)
        if len(text) <= limit:
            return text
        features = features[: len(features) * 3 // 4]
    return json.dumps({**record, "features": []}, separators=(",", ":"), sort_keys=True)[:limit]
