"""Feature enrichment at predict time: an endpoint's ``spec.features`` names a feature service and
the request fields that are its entity keys; each request row then carries those keys (and any
request-time features), the platform reads the service's features from the online store
(:mod:`app.features.online`) and merges them into the row by name before the model call.

Merge rules, per row and feature:

* a value the request itself carries wins (request-time features, or a client that overrides a
  stored value); it is neither stale nor missing;
* a stored value whose view's event timestamp is older than ``max_age_s`` is *stale* and
  treated as missing (Feast does not apply TTL to online reads: feast#6821, feast#4133);
* a missing (or stale) value is handled by ``on_missing``: ``error`` refuses the request (422
  naming the entity and the features), ``default`` uses the declared ``defaults[feature]``,
  ``null`` passes None (a numeric runtime then refuses the row, naming the feature);
* entity-key fields the model does not take (its recorded input names) are dropped.

The answer reports ``{"stale": [...], "missing": [...]}`` (feature names over all rows) and the
prediction log keeps, per row, the stored features used and which were stale or missing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.errors import InvalidInput, NotFound


class FeatureEnrichment(BaseModel):
    """``spec.features`` of an endpoint: which stored features join each request."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(..., min_length=1, description="The Feast feature service whose features join each request.")
    entity_keys: list[str] = Field(
        ..., min_length=1, description="Request fields holding the entity keys: the service's join keys (e.g. customer_id)."
    )
    max_age_s: float | None = Field(
        None, gt=0, description="Stored values older than this (by their view's event timestamp) are stale and "
        "treated as missing; unset = any age is accepted.",
    )
    on_missing: Literal["error", "default", "null"] = Field(
        "error", description="A missing or stale feature: error (422 naming the entity and features), default "
        "(the value in `defaults`), null (None).",
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Feature -> value used when on_missing is default (one per feature of the service).",
    )

    @field_validator("entity_keys")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


@dataclass
class Enriched:
    """What enrichment did to a request: the rows the model takes, the aggregated report, and
    per row what the prediction log keeps (``{"values": {...}, "stale"?: [...], "missing"?: [...]}``)."""

    rows: list[dict[str, Any]]
    stale: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    used: list[dict[str, Any]] = field(default_factory=list)

    @property
    def report(self) -> dict[str, list[str]]:
        return {"stale": self.stale, "missing": self.missing}


def check_spec(spec: FeatureEnrichment, reader: Any) -> None:
    """At endpoint creation or update: the service exists, ``entity_keys`` are its join keys, and
    ``on_missing: default`` declares a default for every feature (InvalidInput otherwise)."""
    try:
        names, join_keys = reader.names, reader.join_keys
    except NotFound as exc:
        raise InvalidInput(f"features.service: {exc.message}; create it with POST /v1/features/services",
                           details={"field": "features.service"}) from None
    absent = [k for k in join_keys if k not in spec.entity_keys]
    if absent:
        raise InvalidInput(
            f"features.entity_keys {spec.entity_keys} lack the join key(s) {absent} of feature service {spec.service!r}",
            details={"field": "features.entity_keys", "join_keys": join_keys})
    if spec.on_missing == "default":
        lacking = [n for n in names if n not in spec.defaults]
        if lacking:
            raise InvalidInput(
                f"features.defaults: on_missing is 'default' but no default is declared for {lacking}",
                details={"field": "features.defaults", "missing": lacking})
    unknown = [n for n in spec.defaults if n not in names]
    if unknown:
        raise InvalidInput(f"features.defaults names feature(s) {unknown} that service {spec.service!r} does not serve",
                           details={"field": "features.defaults"})


def request_rows(payload: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The request's rows as objects, and the form they came in (``instances`` | ``inputs``)."""
    instances, inputs = payload.get("instances"), payload.get("inputs")
    if isinstance(instances, list) and instances and all(isinstance(r, dict) for r in instances):
        return [dict(r) for r in instances], "instances"
    if isinstance(inputs, dict) and inputs and all(isinstance(c, list) for c in inputs.values()):
        lengths = {len(c) for c in inputs.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise InvalidInput("every column in 'inputs' must be a non-empty list, all of one length",
                               details={"field": "inputs"})
        names = list(inputs)
        return [dict(zip(names, values)) for values in zip(*inputs.values())], "inputs"
    raise InvalidInput(
        "this endpoint joins stored features by name: send 'instances' as objects keyed by field name "
        "(entity keys and request-time features) or 'inputs' as columns",
        details={"field": "instances"})


def merge(spec: FeatureEnrichment, rows: list[dict[str, Any]], result: Any, *, now: float | None = None,
          model_inputs: list[str] | None = None) -> Enriched:
    """Merge an :class:`app.features.online.OnlineResult` of ``rows`` (read with the rows' entity
    keys, in order) into the rows, by the rules of the module docstring."""
    now = time.time() if now is None else now
    max_age = spec.max_age_s
    stale_all: dict[str, None] = {}
    missing_all: dict[str, None] = {}
    out_rows, used = [], []
    drop = [k for k in spec.entity_keys if k not in (model_inputs if model_inputs is not None else result.names)]
    cutoff = {view: [None if ts is None else (max_age is not None and now - ts.timestamp() > max_age) for ts in stamps]
              for view, stamps in result.event_timestamps.items()}
    for i, row in enumerate(rows):
        merged = dict(row)
        values: dict[str, Any] = {}
        stale, missing = [], []
        for name in result.names:
            if name in row:
                continue
            too_old = cutoff[result.view_of[name]][i]
            value = result.values[name][i]
            if too_old is None or value is None:
                missing.append(name)
            elif too_old:
                stale.append(name)
            else:
                merged[name] = values[name] = value
                continue
            if spec.on_missing == "default" and name in spec.defaults:
                merged[name] = values[name] = spec.defaults[name]
            elif spec.on_missing != "error":
                merged[name] = values[name] = None
        if (stale or missing) and spec.on_missing == "error":
            entity = {k: row.get(k) for k in spec.entity_keys}
            parts = ([f"missing {missing}"] if missing else []) + (
                [f"stale (older than max_age_s={max_age:g}) {stale}"] if stale else [])
            raise InvalidInput(
                f"instances[{i}]: entity {entity} has {' and '.join(parts)} in feature service {spec.service!r} "
                "(the endpoint's features.on_missing is 'error'; send the features in the request to override)",
                details={"field": f"instances[{i}]", "entity": entity, "missing": missing, "stale": stale})
        for k in drop:
            merged.pop(k, None)
        out_rows.append(merged)
        entry: dict[str, Any] = {"values": values}
        if stale:
            entry["stale"] = stale
        if missing:
            entry["missing"] = missing
        used.append(entry)
        stale_all.update(dict.fromkeys(stale))
        missing_all.update(dict.fromkeys(missing))
    return Enriched(out_rows, list(stale_all), list(missing_all), used)


class Enricher:
    """Enriches requests of endpoints with ``spec.features``, in the Gateway: one
    :class:`app.features.online.OnlineReader` per service on the process's feature store."""

    def __init__(self, settings: Any):
        self.settings = settings
        self._store: Any = None

    def store(self) -> Any:
        """The process's feature store (blocking on first use)."""
        if self._store is None:
            from app.features.repo import open_store

            self._store = open_store(self.settings)
        return self._store

    def reader(self, service: str) -> Any:
        from app.features.online import reader_for

        return reader_for(self.store(), service, timeout_s=self.settings.features.online_timeout_s)

    def check(self, spec: FeatureEnrichment) -> None:
        """:func:`check_spec` against the registry (blocking)."""
        check_spec(spec, self.reader(spec.service))

    async def enrich(self, spec: FeatureEnrichment, payload: dict[str, Any],
                     model_inputs: list[str] | None) -> tuple[dict[str, Any], Enriched]:
        """The payload the model takes (named rows with the stored features merged) and what
        was done. InvalidInput for a request without the entity keys or (on_missing error)
        with missing features; DependencyUnavailable when the online store fails or is slow."""
        rows, form = request_rows(payload)
        absent = [k for k in spec.entity_keys if any(k not in r for r in rows)]
        if absent:
            raise InvalidInput(f"every row needs the entity key(s) {absent} (this endpoint joins feature service "
                               f"{spec.service!r} on {spec.entity_keys})", details={"field": absent[0]})
        if self._store is None:
            await asyncio.to_thread(self.store)
        reader = self.reader(spec.service)
        result = await reader.read_async({k: [r[k] for r in rows] for k in spec.entity_keys})
        done = merge(spec, rows, result, model_inputs=model_inputs)
        out = {k: v for k, v in payload.items() if k not in ("instances", "inputs")}
        if form == "instances":
            out["instances"] = done.rows
        else:
            names = list(done.rows[0])
            out["inputs"] = {n: [r.get(n) for r in done.rows] for n in names}
        return out, done
