"""The request shapes of feature definitions (``/v1/features/entities``, ``sources``, ``views``,
``services``) and the dtypes a view's schema may name. Pydantic checks their form; what needs the
registry or the files (references, columns, paths) is checked by
``app.features.definitions.FeatureDefinitions`` before anything is applied."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,62}$"


def feast_dtypes() -> dict[str, Any]:
    """``DTYPES`` name -> ``feast.types`` type (Feast imported on first use)."""
    from feast import types as t

    scalars = [t.Float32, t.Float64, t.Int32, t.Int64, t.String, t.Bool, t.Bytes, t.UnixTimestamp]
    table = {str(s): s for s in scalars}
    for s in scalars:
        table[str(t.Array(s))] = t.Array(s)
    return table


# The dtypes a view's schema may name (Feast's own type names): the scalars and their arrays.
DTYPES: tuple[str, ...] = (
    "Float32", "Float64", "Int32", "Int64", "String", "Bool", "Bytes", "UnixTimestamp",
    "Array(Float32)", "Array(Float64)", "Array(Int32)", "Array(Int64)", "Array(String)", "Array(Bool)",
    "Array(Bytes)", "Array(UnixTimestamp)",
)

_Name = Field(..., pattern=NAME_PATTERN, description="Letters, digits and '_', starting with a letter; at most 63.")


class EntityDef(BaseModel):
    """An entity: what features are about, and the column that identifies it in every source."""

    model_config = ConfigDict(extra="forbid")
    name: str = _Name
    join_keys: list[str] = Field(
        default_factory=list, max_length=1,
        description="The column naming the entity in sources and in online reads (Feast takes one); "
        "default: the entity's name.",
    )
    dtype: str | None = Field(
        None, max_length=32, description="The join key's type, one of the scalar dtypes (Int64, String, ...); "
        "default: taken from the first view that uses the entity.",
    )
    description: str = Field("", max_length=2000)
    tags: dict[str, str] = Field(default_factory=dict, description="Free metadata; keys 'matih.*' are reserved.")


class StreamDef(BaseModel):
    """Where a push source's events arrive; the StreamIngestor reads them and pushes them."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["kafka", "redis"] = Field(..., description="kafka (a topic) or redis (a Redis stream key).")
    topic: str = Field(..., min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._:\-]+$",
                       description="The Kafka topic or Redis stream key.")


class SourceDef(BaseModel):
    """A data source: a parquet file (or folder of them) under the data roots, or a push source
    whose rows arrive through the push API (and optionally a stream) and land, when pushed
    offline, in the parquet at ``path``."""

    model_config = ConfigDict(extra="forbid")
    name: str = _Name
    kind: Literal["file", "push"] = Field("file", description="file: batch data at `path`; push: rows pushed "
                                          "through the API or a stream, with `path` as its batch (offline) data.")
    path: str = Field(..., min_length=1, max_length=2048,
                      description="The parquet file or folder, inside the data roots (relative: under the first).")
    timestamp_field: str = Field(..., min_length=1, max_length=128, description="The event-time column.")
    created_timestamp_field: str | None = Field(
        None, max_length=128, description="Optional row-creation time column, to break ties between rows of one time.")
    description: str = Field("", max_length=2000)
    stream: StreamDef | None = Field(None, description="Push sources only: a stream the StreamIngestor reads.")


class FieldDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., max_length=128, description="A column of the source.")
    dtype: str = Field(..., max_length=32, description="One of " + ", ".join(DTYPES) + ".")


class ViewDef(BaseModel):
    """A feature view: features of some entities, read from a source, kept online for ``ttl_s``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = _Name
    entities: list[str] = Field(..., max_length=16, description="Entity names (their join keys must be columns).")
    source: str = Field(..., max_length=63, description="A source's name.")
    ttl_s: int = Field(..., ge=0, le=10 * 365 * 86400,
                       description="How old a feature value may be and still be served; 0 = forever.")
    fields: list[FieldDef] = Field(
        default_factory=list, alias="schema", max_length=1000,
        description="The features: columns of the source with their dtypes; empty = every other column, "
        "dtypes inferred by Feast.",
    )
    online: bool = Field(True, description="Whether materialization writes the view to the online store.")
    description: str = Field("", max_length=2000)
    tags: dict[str, str] = Field(default_factory=dict, description="Free metadata; keys 'matih.*' are reserved.")


class ServiceDef(BaseModel):
    """A feature service: a named set of features, what a model reads."""

    model_config = ConfigDict(extra="forbid")
    name: str = _Name
    features: list[str] = Field(..., min_length=1, max_length=1000,
                                description="'view' (all its features) or 'view:feature'.")
    description: str = Field("", max_length=2000)
