"""Where and how the prediction log is stored: parquet files under ``predlog.root`` (a folder,
or s3://bucket/prefix), partitioned by endpoint and hour (hive style, so pyarrow and Ray Data
read the partition keys as columns):

    <root>/endpoint=<name>/hour=2026-12-03T07/<file id>.parquet

One row per instance of a request (a request of 3 rows is 3 records sharing ``request_id``,
``instance`` 0..2). Everything the serving path, the readers and the maintenance jobs agree on
is declared here."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa

ENDPOINT_KEY = "endpoint"
HOUR_KEY = "hour"
HOUR_FORMAT = "%Y-%m-%dT%H"

# Columns of every file (the partition keys endpoint and hour are in the paths, and also
# stored as columns so that a file read alone is complete).
SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("instance", pa.int32(), nullable=False),
        pa.field("client_request_id", pa.string()),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("endpoint", pa.string(), nullable=False),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("protocol", pa.string(), nullable=False),
        pa.field("inputs", pa.string()),  # JSON object {feature: value}; null when not kept
        pa.field("prediction", pa.string()),  # JSON: the label or value; null when outputs are not kept
        pa.field("probabilities", pa.list_(pa.float64())),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("caller", pa.string()),
        # The HTTP status of the answer (200; 4xx/5xx for a request that failed, logged without
        # outputs); null in files written before the column existed, which held only successes.
        pa.field("status", pa.int16()),
        # JSON {"values": {feature: value}, "stale"?: [...], "missing"?: [...]}: the stored features an
        # enriching endpoint joined to the row (app.features.enrichment); null otherwise and in files
        # written before the column existed.
        pa.field("features", pa.string()),
    ]
)

# The log of an endpoint's shadow traffic (app.traffic): the shadows' answers, under the same
# request ids as the primary's, in a log of its own (the suffix is no endpoint name's).
SHADOW_SUFFIX = "~shadow"


def shadow_log(endpoint: str) -> str:
    """The name under which the shadow answers of ``endpoint`` are logged."""
    return endpoint + SHADOW_SUFFIX


def hour_of(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime(HOUR_FORMAT)


def partition_dir(root: str, endpoint: str, hour: str) -> str:
    return f"{root.rstrip('/')}/{ENDPOINT_KEY}={endpoint}/{HOUR_KEY}={hour}"


def endpoint_dir(root: str, endpoint: str) -> str:
    return f"{root.rstrip('/')}/{ENDPOINT_KEY}={endpoint}"


def hours_between(since: datetime, until: datetime) -> list[str]:
    """The hour partitions that may hold records with ``since <= timestamp < until``."""
    start = since.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    out = []
    while start < until:
        out.append(start.strftime(HOUR_FORMAT))
        start += timedelta(hours=1)
    return out


def parse_hour(value: str) -> datetime:
    return datetime.strptime(value, HOUR_FORMAT).replace(tzinfo=timezone.utc)
