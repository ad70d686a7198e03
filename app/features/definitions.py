"""Feature definitions: entities, sources, views and services, applied to the managed Feast repo
(``app.features.repo``) through Feast's own ``FeatureStore.apply``, so what the API makes is a
normal Feast registry that ``feast -c $FEAST_REPO_PATH feature-views list`` and Feast's SDK read.

Semantics are ``feast apply``'s: applying a definition creates it or replaces the one of that
name. Everything is checked before Feast is called (names, dtypes, paths inside the data roots,
the parquet's columns, references to other objects), so a refused definition leaves the
registry as it was: ``InvalidInput`` (422) names the request field (``schema[1].dtype``,
``features[0]``); ``Conflict`` (409) names the objects a change would break (an entity's join
key changed under its views, a source, entity or view deleted while something uses it).
Applies are serialized in this process by one lock.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from app.errors import Conflict, DependencyUnavailable, InvalidInput, NotFound
from app.features.repo import STREAM_KIND_TAG, STREAM_TOPIC_TAG, open_store
from app.features.specs import DTYPES, EntityDef, ServiceDef, SourceDef, ViewDef, feast_dtypes
from app.settings import Settings

_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Tag keys under this prefix are the platform's (stream declarations, the push batch source's owner).
RESERVED_TAG_PREFIX = "matih."
# A push source's batch FileSource is a data source of its own in Feast's registry, named
# ``<push name>__batch`` and tagged with its owner; the API shows it only inside its push source.
BATCH_SUFFIX = "__batch"
_BATCH_OF_TAG = "matih.batch_of"
_DUMMY_ENTITY = "__dummy"
_apply_lock = threading.Lock()

try:  # redis-py's connection errors are not the builtin ones
    from redis.exceptions import ConnectionError as _RedisConnectionError
    from redis.exceptions import TimeoutError as _RedisTimeoutError

    _RedisUnreachable: tuple[type[Exception], ...] = (_RedisConnectionError, _RedisTimeoutError)
except ImportError:  # pragma: no cover - redis is a dependency of the platform
    _RedisUnreachable = ()


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # Feast stores UTC and returns some timestamps naive
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", details={"field": field})


def _check_tags(tags: dict[str, str]) -> None:
    for key in tags:
        if key.startswith(RESERVED_TAG_PREFIX):
            raise _bad(f"tags.{key}", f"tag keys starting with {RESERVED_TAG_PREFIX!r} are reserved")


def _check_name(name: str, field: str) -> None:
    if BATCH_SUFFIX in name:
        raise _bad(field, f"{name!r} holds {BATCH_SUFFIX!r}, reserved for the platform's own names")


def _check_column(value: str, field: str) -> None:
    if not _COLUMN_RE.match(value):
        raise _bad(field, f"{value!r} is not a column name (letters, digits and '_', at most 128)")


class FeatureDefinitions:
    """Apply, list, get and delete feature definitions in the managed repo of ``settings``
    (``open_store``). Every method is blocking (Feast, the registry database, file reads): the
    API runs them in threads. Objects come back as JSON-able dicts; ``apply_*`` returns
    ``(object, previous)``, ``previous`` None when the name was new."""

    def __init__(self, settings: Settings):
        self.settings = settings

    # -- store access --------------------------------------------------------------------------
    def _store(self):
        return open_store(self.settings)

    def _call(self, fn, *args, **kwargs):
        """A registry or store call, with its connection failures as DependencyUnavailable."""
        from sqlalchemy.exc import OperationalError

        try:
            return fn(*args, **kwargs)
        except OperationalError as exc:
            raise DependencyUnavailable(f"the Feast registry database is unreachable: {exc.orig}") from exc
        except (ConnectionError, TimeoutError, *_RedisUnreachable) as exc:
            raise DependencyUnavailable(f"the Feast online store is unreachable: {exc}") from exc

    def _apply(self, objects: list, delete: list | None = None) -> None:
        store = self._store()
        try:
            if delete:
                self._call(store.apply, objects, objects_to_delete=delete, partial=False)
            else:
                self._call(store.apply, objects)
        except (ValueError, TypeError) as exc:  # Feast's own validation, after ours (inference, type checks)
            raise InvalidInput(f"Feast refused the definition: {exc}", details={"field": "body"}) from exc
        except Exception as exc:
            from feast.errors import FeastError

            if isinstance(exc, FeastError):  # a registry conflict or an object gone meanwhile
                raise Conflict(f"Feast refused the change: {exc}") from exc
            raise
        self._call(store.refresh_registry)

    def _entities(self) -> dict[str, Any]:
        return {e.name: e for e in self._call(self._store().list_entities)}

    def _all_sources(self) -> dict[str, Any]:
        return {s.name: s for s in self._call(self._store().list_data_sources)}

    def _sources(self) -> dict[str, Any]:
        return {n: s for n, s in self._all_sources().items() if _BATCH_OF_TAG not in (s.tags or {})}

    def _views(self) -> dict[str, Any]:
        return {v.name: v for v in self._call(self._store().list_feature_views)}

    def _services(self) -> dict[str, Any]:
        return {s.name: s for s in self._call(self._store().list_feature_services)}

    # -- parquet ----------------------------------------------------------------------------------
    def _location(self, path: str, field: str) -> str:
        from app.storage.paths import check_job_location

        try:
            return check_job_location(path, self.settings, field, must_exist=True)
        except NotFound as exc:
            raise _bad(field, f"{path!r} does not exist: write the parquet there first") from exc

    def _columns(self, location: str) -> dict[str, Any] | None:
        """The parquet's columns and arrow types (from its footers, not its data); None when it
        cannot be read now."""
        import pyarrow.dataset as ds

        from app.storage.s3 import resolve_uri

        try:
            path, fs = resolve_uri(location, self.settings)
            schema = ds.dataset(path, filesystem=fs, format="parquet").schema
        except Exception:  # noqa: BLE001 - unreadable now: the caller decides what that means
            return None
        return {f.name: f.type for f in schema}

    def _source_columns(self, source) -> dict[str, Any] | None:
        batch = getattr(source, "batch_source", None) or source
        return self._columns(batch.path) if hasattr(batch, "path") else None

    # -- entities -----------------------------------------------------------------------------
    def apply_entity(self, spec: EntityDef) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from feast import Entity
        from feast.value_type import ValueType

        _check_name(spec.name, "name")
        _check_tags(spec.tags)
        join_keys = spec.join_keys or [spec.name]
        _check_column(join_keys[0], "join_keys[0]")
        value_type = None
        if spec.dtype is not None:
            if spec.dtype not in DTYPES or spec.dtype.startswith("Array"):
                raise _bad("dtype", f"{spec.dtype!r} is not a scalar dtype; use one of "
                           + ", ".join(d for d in DTYPES if not d.startswith("Array")))
            value_type = feast_dtypes()[spec.dtype].to_value_type()
        with _apply_lock:
            old = self._entities().get(spec.name)
            retyped = (old is not None and value_type is not None and old.value_type != ValueType.UNKNOWN
                       and old.value_type != value_type)
            if old is not None and (old.join_key != join_keys[0] or retyped):
                users = sorted(v.name for v in self._views().values() if spec.name in v.entities)
                field, what = ("dtype", "type") if old.join_key == join_keys[0] else ("join_keys", "join key")
                if users:
                    raise Conflict(
                        f"entity {spec.name!r} is used by the views {', '.join(users)}: its {what} cannot change; "
                        "delete or change those views first",
                        details={"field": field, "used_by": users},
                    )
            if value_type is None:
                value_type = old.value_type if old is not None else ValueType.UNKNOWN
            entity = Entity(name=spec.name, join_keys=join_keys, description=spec.description, tags=spec.tags,
                            value_type=value_type)
            before = self._entity_dict(old) if old is not None else None
            self._apply([entity])
            return self.get_entity(spec.name), before

    def list_entities(self) -> list[dict[str, Any]]:
        views = list(self._views().values())
        return [self._entity_dict(e, views) for e in sorted(self._entities().values(), key=lambda e: e.name)]

    def get_entity(self, name: str) -> dict[str, Any]:
        entity = self._entities().get(name)
        if entity is None:
            raise NotFound(f"no feature entity {name!r}; GET /v1/features/entities lists them")
        return self._entity_dict(entity, list(self._views().values()))

    def delete_entity(self, name: str) -> dict[str, Any]:
        with _apply_lock:
            entity = self._entities().get(name)
            if entity is None:
                raise NotFound(f"no feature entity {name!r}")
            users = sorted(v.name for v in self._views().values() if name in v.entities)
            if users:
                raise Conflict(f"entity {name!r} is used by the views {', '.join(users)}; delete them first",
                               details={"used_by": users})
            before = self._entity_dict(entity, [])
            self._apply([], delete=[entity])
            return before

    @staticmethod
    def _entity_dict(entity, views: list | None = None) -> dict[str, Any]:
        from feast.value_type import ValueType

        out = {
            "name": entity.name, "join_keys": [entity.join_key], "description": entity.description,
            "tags": dict(entity.tags),
            "value_type": None if entity.value_type == ValueType.UNKNOWN else entity.value_type.name,
            "created_at": _iso(entity.created_timestamp), "updated_at": _iso(entity.last_updated_timestamp),
        }
        if views is not None:
            out["used_by"] = sorted(v.name for v in views if entity.name in v.entities)
        return out

    # -- sources ------------------------------------------------------------------------------
    def apply_source(self, spec: SourceDef) -> tuple[dict[str, Any], dict[str, Any] | None]:
        _check_name(spec.name, "name")
        if spec.stream is not None and spec.kind != "push":
            raise _bad("stream", "only push sources read a stream; use kind 'push' or drop 'stream'")
        import pyarrow as pa

        location = self._location(spec.path, "path")
        columns = self._columns(location)
        if columns is None:
            raise _bad("path", f"{spec.path!r} is not readable as parquet")
        for field, col in (("timestamp_field", spec.timestamp_field),
                           ("created_timestamp_field", spec.created_timestamp_field)):
            if col is None:
                continue
            if col not in columns:
                raise _bad(field, f"{col!r} is not a column of {spec.path!r} (it has {', '.join(sorted(columns))})")

            if not pa.types.is_timestamp(columns[col]) and not pa.types.is_date(columns[col]):
                raise _bad(field, f"column {col!r} is {columns[col]}, not a timestamp")
        source = self._feast_source(spec, location)
        with _apply_lock:
            sources = self._all_sources()
            old = sources.get(spec.name)
            objects: list = [source]
            if old is not None:
                objects += self._rebind_views(spec.name, old, source, columns)
            before = self._source_dict(old) if old is not None else None
            delete = []
            old_batch = sources.get(spec.name + BATCH_SUFFIX)
            if old_batch is not None and spec.kind == "file":
                delete.append(old_batch)
            self._apply(objects, delete or None)
            return self.get_source(spec.name), before

    def _feast_source(self, spec: SourceDef, location: str):
        from feast import FileSource, PushSource

        kwargs: dict[str, Any] = {"timestamp_field": spec.timestamp_field,
                                  "created_timestamp_column": spec.created_timestamp_field or ""}
        if location.startswith(("s3://", "s3a://")) and self.settings.s3_endpoint:
            kwargs["s3_endpoint_override"] = self.settings.s3_endpoint
        if spec.kind == "file":
            return FileSource(name=spec.name, path=location, description=spec.description, **kwargs)
        batch = FileSource(name=spec.name + BATCH_SUFFIX, path=location, tags={_BATCH_OF_TAG: spec.name}, **kwargs)
        tags = {STREAM_KIND_TAG: spec.stream.kind, STREAM_TOPIC_TAG: spec.stream.topic} if spec.stream else {}
        return PushSource(name=spec.name, batch_source=batch, description=spec.description, tags=tags)

    def _rebind_views(self, name: str, old, source, columns: dict[str, Any]) -> list:
        """The views reading source ``name``, bound to its replacement: ``feast apply`` of a repo
        re-applies them with it; 409 when the kind changes or a view's columns would be missing."""
        users = [v for v in self._views().values() if self._view_source_name(v) == name]
        if not users:
            return []
        names = sorted(v.name for v in users)
        if type(old) is not type(source):
            raise Conflict(f"source {name!r} is used by the views {', '.join(names)}: its kind cannot change; "
                           "delete those views first", details={"field": "kind", "used_by": names})
        entities = self._entities()
        rebound = []
        for view in users:
            needed = [f.name for f in view.features] + [entities[e].join_key for e in view.entities if e in entities]
            missing = sorted(c for c in needed if c not in columns)
            if missing:
                raise Conflict(f"view {view.name!r} reads the columns {', '.join(missing)}, which the new parquet "
                               "lacks", details={"field": "path", "used_by": names})
            rebound.append(_copy_view(view, source))
        return rebound

    def list_sources(self) -> list[dict[str, Any]]:
        views = list(self._views().values())
        return [self._source_dict(s, views) for s in sorted(self._sources().values(), key=lambda s: s.name)]

    def get_source(self, name: str) -> dict[str, Any]:
        source = self._sources().get(name)
        if source is None:
            raise NotFound(f"no feature source {name!r}; GET /v1/features/sources lists them")
        return self._source_dict(source, list(self._views().values()))

    def delete_source(self, name: str) -> dict[str, Any]:
        with _apply_lock:
            source = self._sources().get(name)
            if source is None:
                raise NotFound(f"no feature source {name!r}")
            users = sorted(v.name for v in self._views().values() if self._view_source_name(v) == name)
            if users:
                raise Conflict(f"source {name!r} is used by the views {', '.join(users)}; delete them first",
                               details={"used_by": users})
            before = self._source_dict(source, [])
            delete = [source]
            batch = self._all_sources().get(name + BATCH_SUFFIX)
            if batch is not None:
                delete.append(batch)
            self._apply([], delete=delete)
            return before

    @staticmethod
    def _view_source_name(view) -> str | None:
        source = view.stream_source or view.batch_source
        return source.name if source is not None else None

    def _source_dict(self, source, views: list | None = None) -> dict[str, Any]:
        from feast import PushSource

        push = isinstance(source, PushSource)
        batch = source.batch_source if push else source
        tags = source.tags or {}
        stream = ({"kind": tags[STREAM_KIND_TAG], "topic": tags.get(STREAM_TOPIC_TAG, "")}
                  if push and STREAM_KIND_TAG in tags else None)
        out = {
            "name": source.name, "kind": "push" if push else "file", "path": getattr(batch, "path", None),
            "timestamp_field": batch.timestamp_field if batch is not None else None,
            "created_timestamp_field": (batch.created_timestamp_column or None) if batch is not None else None,
            "description": source.description, "stream": stream,
            "created_at": _iso(source.created_timestamp), "updated_at": _iso(source.last_updated_timestamp),
        }
        if views is not None:
            out["used_by"] = sorted(v.name for v in views if self._view_source_name(v) == source.name)
        return out

    # -- views --------------------------------------------------------------------------------
    def apply_view(self, spec: ViewDef) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from feast import FeatureView
        from feast import Field as FeastField

        _check_name(spec.name, "name")
        _check_tags(spec.tags)
        types = feast_dtypes()
        seen: set[str] = set()
        for i, f in enumerate(spec.fields):
            _check_column(f.name, f"schema[{i}].name")
            if f.name in seen:
                raise _bad(f"schema[{i}].name", f"{f.name!r} is named twice")
            seen.add(f.name)
            if f.dtype not in types:
                raise _bad(f"schema[{i}].dtype", f"{f.dtype!r} is not a dtype; use one of {', '.join(DTYPES)}")
        if len(set(spec.entities)) < len(spec.entities):
            raise _bad("entities", "an entity is named twice")
        with _apply_lock:
            entities = self._entities()
            chosen = []
            for i, name in enumerate(spec.entities):
                if name not in entities:
                    raise _bad(f"entities[{i}]", f"no entity {name!r}; POST /v1/features/entities first")
                chosen.append(entities[name])
            keys = [e.join_key for e in chosen]
            if len(set(keys)) < len(keys):
                raise _bad("entities", "two of the entities share a join key")
            source = self._sources().get(spec.source)
            if source is None:
                raise _bad("source", f"no source {spec.source!r}; POST /v1/features/sources first")
            columns = self._source_columns(source)
            batch = getattr(source, "batch_source", None) or source
            if columns is not None:
                for i, key in enumerate(keys):
                    if key not in columns:
                        raise _bad(f"entities[{i}]", f"the join key {key!r} is not a column of source {spec.source!r}")
                for i, f in enumerate(spec.fields):
                    if f.name not in columns:
                        raise _bad(f"schema[{i}].name", f"{f.name!r} is not a column of source {spec.source!r} "
                                   f"(it has {', '.join(sorted(columns))})")
                    if not _fits(f.dtype, columns[f.name]):
                        raise _bad(f"schema[{i}].dtype", f"column {f.name!r} of source {spec.source!r} holds "
                                   f"{columns[f.name]}, which is not {f.dtype}")
            for i, f in enumerate(spec.fields):
                if f.name in (batch.timestamp_field, batch.created_timestamp_column):
                    raise _bad(f"schema[{i}].name", f"{f.name!r} is the source's timestamp, not a feature")
            old = self._views().get(spec.name)
            if spec.fields:
                features = {f.name for f in spec.fields if f.name not in keys}
            else:  # Feast infers the features: every column but the keys and timestamps
                stamps = {batch.timestamp_field, batch.created_timestamp_column}
                features = set(columns or ()) - set(keys) - stamps
            if old is not None and (spec.fields or columns is not None):
                self._check_services_keep(spec.name, features)
            view = FeatureView(
                name=spec.name, entities=chosen, source=source, ttl=timedelta(seconds=spec.ttl_s),
                schema=[FeastField(name=f.name, dtype=types[f.dtype]) for f in spec.fields],
                online=spec.online, description=spec.description, tags=spec.tags,
            )
            before = self._view_dict(old) if old is not None else None
            self._apply([view])
            self._type_entities(spec.name, chosen)
            return self.get_view(spec.name), before

    def _type_entities(self, view_name: str, entities: list) -> None:
        """Entities declared without a dtype take their join key's type from the first view
        that uses them (Feast infers it from the source), so the registry and CLI show it."""
        import copy

        from feast.value_type import ValueType

        untyped = [e for e in entities if e.value_type == ValueType.UNKNOWN]
        if not untyped:
            return
        columns = {f.name: f.dtype for f in self._views()[view_name].entity_columns}
        typed = []
        for entity in untyped:
            if entity.join_key in columns:
                new = copy.copy(entity)
                new.value_type = columns[entity.join_key].to_value_type()
                typed.append(new)
        if typed:
            self._apply(typed)

    def _check_services_keep(self, view: str, features: set[str]) -> None:
        broken = sorted({s.name for s in self._services().values()
                         for p in s.feature_view_projections if p.name == view
                         for f in p.features if f.name not in features})
        if broken:
            raise Conflict(f"the feature services {', '.join(broken)} read features of {view!r} that the new "
                           "definition drops; change or delete those services first",
                           details={"field": "schema", "used_by": broken})

    def list_views(self) -> list[dict[str, Any]]:
        services = list(self._services().values())
        return [self._view_dict(v, services) for v in sorted(self._views().values(), key=lambda v: v.name)]

    def get_view(self, name: str) -> dict[str, Any]:
        view = self._views().get(name)
        if view is None:
            raise NotFound(f"no feature view {name!r}; GET /v1/features/views lists them")
        return self._view_dict(view, list(self._services().values()))

    def delete_view(self, name: str) -> dict[str, Any]:
        with _apply_lock:
            view = self._views().get(name)
            if view is None:
                raise NotFound(f"no feature view {name!r}")
            users = sorted(s.name for s in self._services().values()
                           if any(p.name == name for p in s.feature_view_projections))
            if users:
                raise Conflict(f"view {name!r} is used by the feature services {', '.join(users)}; delete them first",
                               details={"used_by": users})
            before = self._view_dict(view, [])
            self._apply([], delete=[view])
            return before

    def _view_dict(self, view, services: list | None = None) -> dict[str, Any]:
        out = {
            "name": view.name, "entities": [e for e in view.entities if e != _DUMMY_ENTITY],
            "source": self._view_source_name(view), "ttl_s": int(view.ttl.total_seconds()) if view.ttl else 0,
            "schema": [{"name": f.name, "dtype": str(f.dtype)} for f in view.features],
            "entity_columns": [{"name": f.name, "dtype": str(f.dtype)} for f in view.entity_columns],
            "online": view.online, "description": view.description, "tags": dict(view.tags),
            "created_at": _iso(view.created_timestamp), "updated_at": _iso(view.last_updated_timestamp),
        }
        if services is not None:
            out["used_by"] = sorted(s.name for s in services
                                    if any(p.name == view.name for p in s.feature_view_projections))
        return out

    # -- services -----------------------------------------------------------------------------
    def apply_service(self, spec: ServiceDef) -> tuple[dict[str, Any], dict[str, Any] | None]:
        from feast import FeatureService

        _check_name(spec.name, "name")
        with _apply_lock:
            views = self._views()
            wanted: dict[str, list[str] | None] = {}  # view -> features (None: all of them)
            for i, ref in enumerate(spec.features):
                view_name, _, feature = ref.partition(":")
                view = views.get(view_name)
                if view is None:
                    raise _bad(f"features[{i}]", f"no feature view {view_name!r} (refs are 'view' or 'view:feature')")
                names = [f.name for f in view.features]
                if not feature:
                    wanted[view_name] = None
                    continue
                if feature not in names:
                    raise _bad(f"features[{i}]", f"view {view_name!r} has no feature {feature!r} "
                               f"(it has {', '.join(names)})")
                current = wanted.get(view_name, [])
                if current is not None and feature not in current:
                    wanted[view_name] = current + [feature]
                elif view_name not in wanted:
                    wanted[view_name] = [feature]
            projections = [views[v] if fs is None else views[v][fs] for v, fs in wanted.items()]
            service = FeatureService(name=spec.name, features=projections, description=spec.description)
            old = self._services().get(spec.name)
            before = self._service_dict(old) if old is not None else None
            self._apply([service])
            return self.get_service(spec.name), before

    def list_services(self) -> list[dict[str, Any]]:
        return [self._service_dict(s) for s in sorted(self._services().values(), key=lambda s: s.name)]

    def get_service(self, name: str) -> dict[str, Any]:
        service = self._services().get(name)
        if service is None:
            raise NotFound(f"no feature service {name!r}; GET /v1/features/services lists them")
        return self._service_dict(service)

    def delete_service(self, name: str) -> dict[str, Any]:
        with _apply_lock:
            service = self._services().get(name)
            if service is None:
                raise NotFound(f"no feature service {name!r}")
            before = self._service_dict(service)
            self._apply([], delete=[service])
            return before

    @staticmethod
    def _service_dict(service) -> dict[str, Any]:
        return {
            "name": service.name,
            "features": [f"{p.name_to_use()}:{f.name}" for p in service.feature_view_projections for f in p.features],
            "views": [p.name for p in service.feature_view_projections],
            "description": service.description,
            "created_at": _iso(service.created_timestamp), "updated_at": _iso(service.last_updated_timestamp),
        }


def _fits(dtype: str, arrow_type) -> bool:
    """Whether a parquet column of ``arrow_type`` can be read as ``dtype`` (integers may be read
    as floats; the widths within a family are Feast's to convert)."""
    import pyarrow as pa

    if dtype.startswith("Array("):
        if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
            return False
        return _fits(dtype[len("Array("):-1], arrow_type.value_type)
    family = {
        "Float32": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t),
        "Int32": pa.types.is_integer,
        "String": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t),
        "Bool": pa.types.is_boolean,
        "Bytes": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t),
        "UnixTimestamp": lambda t: pa.types.is_timestamp(t) or pa.types.is_date(t),
    }
    family["Float64"], family["Int64"] = family["Float32"], family["Int32"]
    check = family.get(dtype)
    return check is None or bool(check(arrow_type))


def _copy_view(view, source):
    """A copy of registry view ``view`` reading ``source`` (a push or file source)."""
    import copy

    from feast import PushSource

    new = copy.copy(view)
    new.data_source = source
    if isinstance(source, PushSource):
        new.stream_source, new.batch_source = source, source.batch_source
    else:
        new.stream_source, new.batch_source = None, source
    return new
