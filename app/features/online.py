"""Online feature reads: the platform's read path over Feast's online store, for the online route
(``POST /v1/features/online``) and for enrichment at predict time (:mod:`app.features.enrichment`).

An :class:`OnlineReader` serves one feature service or one list of feature references
(``"view:feature"``). It resolves them against the registry once per registry refresh (Feast's
``cache_ttl_seconds``, the profile's ``features.registry_cache_ttl_s``) and keeps per view what
a read needs. Besides the values, a read returns each view's event timestamp per entity row:
Feast does not apply a view's TTL to online reads (feast#6821, feast#4133), so the caller
decides staleness (``max_age_s`` of an enrichment).

Redis: the keys and hash fields are Feast's own (``feast/infra/online_stores/redis.py``): the
serialized entity key followed by the project, fields ``mmh3("<view>:<feature>")`` and
``_ts:<view>``, precomputed per view. Feast keeps every view of one entity key in the same hash,
so a read is ONE pipelined round trip of one HMGET per entity row and entity (the fields of all
the views on that entity together). :meth:`OnlineReader.read_async` uses redis.asyncio
(the Gateway's event loop is not blocked); :meth:`OnlineReader.read` a blocking client.
SQLite (the local profile): Feast's online store ``online_read`` per view, in a thread when async.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from app.errors import DependencyUnavailable, InvalidInput, NotFound

# Async Redis clients per (connection string, event loop): a redis.asyncio pool belongs to a loop.
_async_clients: dict[tuple[str, int], Any] = {}
_sync_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class _View:
    """What reading one feature view needs, precomputed at resolution."""

    name: str  # the view's name (the key of event_timestamps)
    table: Any  # feast.FeatureView
    join_keys: tuple[str, ...]  # the view's join keys, as stored
    request_keys: tuple[str, ...]  # the entity columns of a request that feed them (projection aliases)
    value_types: tuple[Any, ...]  # feast ValueType of each join key
    features: tuple[str, ...]  # the features read, as the view names them
    outputs: tuple[str, ...]  # the names they have in a result
    fields: tuple[bytes, ...] = ()  # Redis hash fields: mmh3 per feature, then b"_ts:<view>"


@dataclass(frozen=True)
class _Resolved:
    stamp: Any  # the registry proto's refresh time it was resolved at
    views: tuple[_View, ...]
    join_keys: tuple[str, ...]  # every entity column a request must carry
    names: tuple[str, ...]  # result feature names, in request order
    # Views whose rows live in the same Redis hash (Feast keeps every view of one entity key in
    # one hash, a field per feature): indices into ``views``, read by one HMGET per entity row.
    groups: tuple[tuple[int, ...], ...] = ()
    # Per group, the RESP encoding of its HMGET fields (what every read of the group sends after
    # the key) and how many there are: packed once here, not per request.
    packed_fields: tuple[tuple[int, bytes], ...] = ()


@dataclass
class OnlineResult:
    """A read: ``values[name][i]`` of entity row i (None where nothing is stored),
    ``event_timestamps[view][i]`` (None where the view holds nothing for the row), and
    ``view_of[name]`` (the view a feature came from)."""

    names: list[str]
    values: dict[str, list[Any]]
    event_timestamps: dict[str, list[datetime | None]]
    view_of: dict[str, str]
    rows: int = 0
    entities: dict[str, list[Any]] = field(default_factory=dict)


_SCALARS = frozenset(("double_val", "float_val", "int64_val", "int32_val", "string_val", "bool_val", "bytes_val"))


def _decode(value: Any) -> Any:
    """A Feast ValueProto as a plain Python value (None when unset or null)."""
    kind = value.WhichOneof("val")
    if kind in _SCALARS:
        return getattr(value, kind)
    if kind is None or kind == "null_val":
        return None
    raw = getattr(value, kind)
    if kind.endswith("_list_val") or kind.endswith("_set_val"):
        return list(raw.val)
    if kind == "unix_timestamp_val":
        return datetime.fromtimestamp(raw, tz=timezone.utc)
    return raw


def _entity_proto(value: Any, value_type: Any) -> Any:
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto
    from feast.type_map import python_values_to_proto_values
    from feast.value_type import ValueType

    if isinstance(value, float) and value.is_integer() and value_type in (ValueType.INT64, ValueType.INT32):
        value = int(value)  # a key sent as a number of a float tensor (V2 inputs are float32)
    if value_type == ValueType.INT64 and isinstance(value, int) and not isinstance(value, bool):
        return ValueProto(int64_val=value)
    if value_type == ValueType.STRING and isinstance(value, str):
        return ValueProto(string_val=value)
    if value_type == ValueType.INT32 and isinstance(value, int) and not isinstance(value, bool):
        return ValueProto(int32_val=value)
    return python_values_to_proto_values([value], value_type)[0]


def _timestamp(raw: bytes | None) -> datetime | None:
    if not raw:
        return None
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.ParseFromString(raw)
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=timezone.utc)


def _resp_args(args: list[bytes]) -> tuple[int, bytes]:
    """``args`` as RESP bulk strings (the Redis protocol's encoding of a command's arguments)."""
    return len(args), b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _checked(replies: list[Any]) -> list[Any]:
    """The replies, or the first error among them (a reply of the wrong type, say) raised."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _pipelined_hmget_sync(client: Any, commands: list[bytes]) -> list[Any]:
    """The HMGETs (RESP-encoded) as one write and their replies, on one pooled connection: what
    ``client.pipeline(transaction=False)`` sends, without its per-command encoding and
    bookkeeping (most of a read's time). A connection left mid-reply is closed, not reused."""
    pool = client.connection_pool
    conn = pool.get_connection()
    done = False
    try:
        conn.send_packed_command([b"".join(commands)])
        replies = [conn.read_response() for _ in commands]
        done = True
    finally:
        if not done:
            conn.disconnect()
        pool.release(conn)
    return _checked(replies)


async def _pipelined_hmget(client: Any, commands: list[bytes]) -> list[Any]:
    """:func:`_pipelined_hmget_sync` on a redis.asyncio client (a cancelled read, e.g. at the
    timeout, closes the connection rather than returning it with unread replies)."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    done = False
    try:
        await conn.send_packed_command(b"".join(commands))
        replies = [await conn.read_response() for _ in commands]
        done = True
    finally:
        if not done:
            await conn.disconnect()
        await pool.release(conn)
    return _checked(replies)


class OnlineReader:
    """Reads one feature service (``features`` a str) or list of refs (``"view:feature"``) from
    ``store``'s online store (see the module docstring). ``full_feature_names``: results are named
    ``view__feature``. ``timeout_s``: the longest a read may take (Redis socket / await timeout)."""

    def __init__(self, store: Any, features: str | list[str], *, full_feature_names: bool = False,
                 timeout_s: float = 1.0):
        if isinstance(features, list) and not features:
            raise InvalidInput("name at least one feature ('view:feature')", details={"field": "features"})
        self.store = store
        self.features = features
        self.full_feature_names = full_feature_names
        self.timeout_s = timeout_s
        self._resolved: _Resolved | None = None
        self._lock = threading.Lock()
        config = store.config
        self._project = config.project
        self._redis = getattr(config.online_store, "type", "") == "redis"
        self._connection = getattr(config.online_store, "connection_string", "") if self._redis else ""
        self._version = config.entity_key_serialization_version

    # -- resolution ------------------------------------------------------------------------------
    def _stale(self) -> bool:
        registry = self.store.registry
        resolved = self._resolved
        is_valid = getattr(registry, "is_cache_valid", None)
        if resolved is None or (callable(is_valid) and not is_valid()):
            return True
        return getattr(registry, "cached_registry_proto_created", None) != resolved.stamp

    def resolve(self) -> _Resolved:
        """What the reader reads, from the registry as this process caches it; resolved again
        after each registry refresh (blocking: a registry query when the cache expired)."""
        if not self._stale():
            return self._resolved  # type: ignore[return-value]
        with self._lock:
            if not self._stale():
                return self._resolved  # type: ignore[return-value]
            registry = self.store.registry
            refresh = getattr(registry, "_refresh_cached_registry_if_necessary", None)
            if callable(refresh):
                refresh()
            try:
                resolved = self._resolve(registry)
            except (NotFound, InvalidInput):
                # A definition made through another store object may be newer than our cache.
                registry.refresh(self._project)
                resolved = self._resolve(registry)
            self._resolved = resolved
            return resolved

    def _resolve(self, registry: Any) -> _Resolved:
        from feast.errors import FeastObjectNotFoundException, FeatureViewNotFoundException
        from feast.infra.online_stores.helpers import _mmh3, compute_versioned_name
        from feast.utils import _get_online_request_context

        project = self._project
        stamp = getattr(registry, "cached_registry_proto_created", None)
        target: Any = self.features
        if isinstance(target, str):
            try:
                target = registry.get_feature_service(target, project, allow_cache=True)
            except FeastObjectNotFoundException:
                raise NotFound(f"feature service {self.features!r} does not exist in project {project!r}",
                               details={"field": "feature_service", "feature_service": self.features}) from None
        else:
            bad = [r for r in target if not isinstance(r, str) or r.count(":") != 1]
            if bad:
                raise InvalidInput(f"feature references look like 'view:feature'; got {bad[0]!r}",
                                   details={"field": "features"})
        try:
            ctx = _get_online_request_context(registry, project, target, self.full_feature_names)
        except (FeastObjectNotFoundException, FeatureViewNotFoundException, KeyError) as exc:
            raise InvalidInput(f"unknown feature view or feature: {str(exc).strip(chr(39))}",
                               details={"field": "features"}) from None
        except ValueError as exc:  # Feast's collision check of short names
            raise InvalidInput(str(exc), details={"field": "features"}) from None
        refs, odfvs, name_to_key, type_map, _, grouped, _, _, _ = ctx
        if odfvs:
            raise InvalidInput(
                f"on-demand feature views ({', '.join(v.name for v in odfvs)}) are not read online by the platform",
                details={"field": "features"})
        versioning = self.store.config.registry.enable_online_feature_view_versioning
        views, join_keys, names = [], [], []
        for table, feats in grouped:
            known = {f.name for f in table.features}
            unknown = [f for f in feats if f not in known]
            asked = set(feats)
            feats = [f.name for f in table.features if f.name in asked]  # the view's order: stable results
            if unknown:
                raise InvalidInput(f"feature view {table.name!r} has no feature(s) {unknown}",
                                   details={"field": "features"})
            keys = tuple(name_to_key[e] for e in table.entities if e in name_to_key)
            alias = table.projection.join_key_map or {}
            request_keys = tuple(alias.get(k, k) for k in keys)
            view_name = table.projection.name_to_use()
            outputs = tuple(f"{view_name}__{f}" if self.full_feature_names else f for f in feats)
            stored = compute_versioned_name(table, versioning)
            fields = tuple(_mmh3(f"{stored}:{f}") for f in feats) + (f"_ts:{stored}".encode(),)
            views.append(_View(view_name, table, keys, request_keys, tuple(type_map[k] for k in keys),
                               tuple(feats), outputs, fields))
            join_keys.extend(k for k in request_keys if k not in join_keys)
            names.extend(outputs)
        by_key: dict[tuple, list[int]] = {}
        for i, view in enumerate(views):
            by_key.setdefault((view.join_keys, view.request_keys), []).append(i)
        groups = tuple(tuple(g) for g in by_key.values())
        packed = tuple(_resp_args([f for i in g for f in views[i].fields]) for g in groups)
        return _Resolved(stamp, tuple(views), tuple(join_keys), tuple(names), groups, packed)

    @property
    def names(self) -> list[str]:
        """The result's feature names (resolving when needed)."""
        return list(self.resolve().names)

    @property
    def join_keys(self) -> list[str]:
        return list(self.resolve().join_keys)

    # -- reads -----------------------------------------------------------------------------------
    def _keys(self, resolved: _Resolved, entities: dict[str, list[Any]],
              only: set[int] | None = None) -> tuple[int, list[list[Any] | None]]:
        """Per view (of ``only``, when given; None for the others), the entity key protos of each row."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto

        missing = [k for k in resolved.join_keys if k not in entities]
        if missing:
            raise InvalidInput(f"entities: missing join key(s) {missing}; these features need {list(resolved.join_keys)}",
                               details={"field": "entities", "missing": missing})
        lengths = {len(entities[k]) if isinstance(entities[k], list) else -1 for k in resolved.join_keys}
        if -1 in lengths or len(lengths) > 1 or 0 in lengths:
            raise InvalidInput("entities: every join key needs a non-empty list of values, all of one length",
                               details={"field": "entities"})
        n = lengths.pop() if lengths else 0
        per_view: list[list[Any] | None] = []
        for index, view in enumerate(resolved.views):
            if only is not None and index not in only:
                per_view.append(None)
                continue
            cols = [entities[k] for k in view.request_keys]
            protos = []
            for i in range(n):
                try:
                    values = [_entity_proto(col[i], t) for col, t in zip(cols, view.value_types)]
                except (TypeError, ValueError) as exc:
                    raise InvalidInput(f"entities: row {i} of {list(view.request_keys)}: {exc}",
                                       details={"field": "entities"}) from None
                protos.append(EntityKeyProto(join_keys=list(view.join_keys), entity_values=values))
            per_view.append(protos)
        return n, per_view

    def _empty(self, resolved: _Resolved, n: int, entities: dict[str, list[Any]]) -> OnlineResult:
        return OnlineResult(
            names=list(resolved.names), values={name: [None] * n for name in resolved.names},
            event_timestamps={v.name: [None] * n for v in resolved.views},
            view_of={o: v.name for v in resolved.views for o in v.outputs}, rows=n,
            entities={k: list(entities[k]) for k in resolved.join_keys},
        )

    def _redis_commands(self, resolved: _Resolved, entities: dict[str, list[Any]]) -> tuple[int, list[bytes]]:
        """The rows' count and their HMGETs in RESP: one per entity row and group of views sharing
        its hash, with the fields of every view of the group (each view's features, then its
        ``_ts:`` field), group by group."""
        from feast.infra.key_encoding_utils import serialize_entity_key

        n, per_view = self._keys(resolved, entities, only={group[0] for group in resolved.groups})
        project = self._project.encode()
        version = self._version
        commands = []
        for group, (count, fields) in zip(resolved.groups, resolved.packed_fields):
            head = b"*%d\r\n$5\r\nHMGET\r\n" % (count + 2)
            for key in per_view[group[0]]:
                raw = serialize_entity_key(key, entity_key_serialization_version=version) + project
                commands.append(b"%s$%d\r\n%s\r\n%s" % (head, len(raw), raw, fields))
        return n, commands

    def _fill_redis(self, resolved: _Resolved, n: int, replies: list[list[bytes | None]], out: OnlineResult) -> None:
        from feast.protos.feast.types.Value_pb2 import Value as ValueProto

        parse = ValueProto.FromString
        at = 0
        for group in resolved.groups:
            for row in range(n):
                reply = replies[at]
                at += 1
                start = 0
                for i in group:
                    view = resolved.views[i]
                    end = start + len(view.fields)
                    ts = _timestamp(reply[end - 1])
                    if ts is not None:
                        out.event_timestamps[view.name][row] = ts
                        for output, raw in zip(view.outputs, reply[start:end - 1]):
                            if raw:
                                out.values[output][row] = _decode(parse(raw))
                    start = end

    def _fill_rows(self, view: _View, rows: list[tuple[Any, Any]], out: OnlineResult) -> None:
        stamps = out.event_timestamps[view.name]
        for i, (ts, values) in enumerate(rows):
            if not values:
                continue
            if ts is not None and ts.tzinfo is None:
                ts = ts.replace(tzinfo=timezone.utc)
            stamps[i] = ts
            for feature, output in zip(view.features, view.outputs):
                if feature in values:
                    out.values[output][i] = _decode(values[feature])

    def _read_store(self, resolved: _Resolved, per_view: list[list[Any]], out: OnlineResult) -> None:
        """Through Feast's online store (SQLite and any other): one ``online_read`` per view."""
        provider = self.store._get_provider()
        for view, keys in zip(resolved.views, per_view):
            try:
                rows = provider.online_read(self.store.config, view.table, keys, list(view.features))
            except Exception as exc:  # noqa: BLE001 - the store's own errors (a missing table: nothing written yet)
                if "no such table" in str(exc):
                    continue
                raise DependencyUnavailable(f"online store read of {view.name!r} failed: {exc}") from exc
            self._fill_rows(view, rows, out)

    def read(self, entities: dict[str, list[Any]]) -> OnlineResult:
        """The features of each entity row (``entities``: join key -> values, all of one length). Blocking."""
        resolved = self.resolve()
        if not self._redis:
            n, per_view = self._keys(resolved, entities)
            out = self._empty(resolved, n, entities)
            self._read_store(resolved, per_view, out)
            return out
        import redis

        n, commands = self._redis_commands(resolved, entities)
        try:
            replies = _pipelined_hmget_sync(self._sync_client(), commands)
        except redis.RedisError as exc:
            raise DependencyUnavailable(f"online store (Redis) read failed: {exc}") from exc
        out = self._empty(resolved, n, entities)
        self._fill_redis(resolved, n, replies, out)
        return out

    async def read_async(self, entities: dict[str, list[Any]]) -> OnlineResult:
        """:meth:`read` for an event loop: Redis through redis.asyncio (one pipelined round trip),
        other stores in a thread; registry refreshes in a thread. Raises DependencyUnavailable
        when the store fails or the read takes longer than ``timeout_s``."""
        resolved = self._resolved if not self._stale() else await asyncio.to_thread(self.resolve)
        try:
            if not self._redis:
                n, per_view = self._keys(resolved, entities)
                out = self._empty(resolved, n, entities)
                async with asyncio.timeout(self.timeout_s):
                    await asyncio.to_thread(self._read_store, resolved, per_view, out)
                return out
            import redis

            n, commands = self._redis_commands(resolved, entities)
            try:
                async with asyncio.timeout(self.timeout_s):
                    replies = await _pipelined_hmget(self._async_client(), commands)
            except redis.RedisError as exc:
                raise DependencyUnavailable(f"online store (Redis) read failed: {exc}") from exc
        except asyncio.TimeoutError:
            raise DependencyUnavailable(
                f"online store read took longer than {self.timeout_s}s (features.online_timeout_s)") from None
        out = self._empty(resolved, n, entities)
        self._fill_redis(resolved, n, replies, out)
        return out

    # -- Redis clients ---------------------------------------------------------------------------
    def _client_kwargs(self) -> dict[str, Any]:
        from feast.infra.online_stores.redis import RedisOnlineStore

        nodes, kwargs = RedisOnlineStore._parse_connection_string(self._connection)
        kwargs = dict(kwargs)
        kwargs.update(host=nodes[0]["host"], port=int(nodes[0]["port"]), socket_timeout=self.timeout_s,
                      socket_connect_timeout=self.timeout_s)
        return kwargs

    def _sync_client(self) -> Any:
        client = _sync_clients.get(self._connection)
        if client is None:
            import redis

            with _clients_lock:
                client = _sync_clients.get(self._connection)
                if client is None:
                    client = _sync_clients[self._connection] = redis.Redis(**self._client_kwargs())
        return client

    def _async_client(self) -> Any:
        key = (self._connection, id(asyncio.get_running_loop()))
        client = _async_clients.get(key)
        if client is None:
            from redis import asyncio as redis_asyncio

            client = _async_clients[key] = redis_asyncio.Redis(**self._client_kwargs())
        return client


_readers: dict[tuple[int, str, bool], OnlineReader] = {}


def reader_for(store: Any, features: str | list[str], *, full_feature_names: bool = False,
               timeout_s: float = 1.0) -> OnlineReader:
    """The process's reader of ``features`` on ``store`` (one per store, feature set and naming)."""
    key = (id(store), features if isinstance(features, str) else "\x00".join(features), full_feature_names)
    reader = _readers.get(key)
    if reader is None:
        if len(_readers) > 1024:
            _readers.clear()
        reader = _readers[key] = OnlineReader(store, features, full_feature_names=full_feature_names,
                                              timeout_s=timeout_s)
    return reader
