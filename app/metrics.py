"""Platform metrics through Ray's metrics system (``ray.util.metrics``), exported on Ray's
Prometheus endpoint beside Ray Serve's ``ray_serve_*`` series. Names follow Prometheus
conventions: ``matih_`` prefix, ``_total`` for counters, ``_seconds`` for durations.

Callers use the functions below; each is cheap (a dict lookup of its label values and Ray's own
record call) and a no-op in a process where Ray is not initialized (unit tests, the CLI).

Two facts of Ray 2.60's exporter shape what a scrape sees (docs/operations.md):

- Ray puts ``ray_`` before every application metric name, so ``matih_requests`` is exported as
  ``ray_matih_requests_total``. The scrape config's ``metric_relabel_configs`` rule strips it
  (:data:`RELABEL_RULE`), so Prometheus stores exactly the names in :data:`METRICS`.
- A gauge that is not set again within two metrics report intervals disappears from the
  export. This module therefore keeps the last value of every gauge it set and sets it again
  from a daemon thread every half report interval, so a gauge means "the last value set".

Every series also carries Ray's own labels (``Component``, ``NodeAddress``, ``SessionName``,
``Version`` (Ray's version), ``WorkerId``): the model version is therefore ``model_version``,
never ``version``. Errors are not a metric of their own: ``matih_requests_total`` has the HTTP
status in ``code`` (Prometheus' idiom: the error rate is a ratio over one counter).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

# Latency: 0.5 ms (a batched ONNX row in-process) .. 60 s (Serve's request timeout).
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)
REQUESTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
JOB_SECONDS_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as Prometheus stores it (``name``) and as it is registered with Ray."""

    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def ray_name(self) -> str:
        """The name given to Ray: its exporter adds ``ray_`` and, for counters, ``_total``."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names Prometheus stores for this metric."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


_SPECS = (
    MetricSpec("matih_requests_total", "counter", ("endpoint", "model", "model_version", "variant", "protocol", "code"),
               "Prediction requests answered, by endpoint, model version, variant, protocol (rest | v2 | "
               "grpc) and HTTP status code (errors: code >= 400)."),
    MetricSpec("matih_request_duration_seconds", "histogram", ("endpoint", "model", "model_version", "variant"),
               "Seconds from a prediction request's arrival at the Gateway to its answer.", SECONDS_BUCKETS),
    MetricSpec("matih_shadow_requests_total", "counter", ("endpoint", "shadow", "outcome"),
               "Copies of requests sent to an endpoint's shadows, by outcome: ok | error | dropped (the replica "
               "had serving.shadow_max_in_flight shadow calls running)."),
    MetricSpec("matih_shadow_duration_seconds", "histogram", ("endpoint", "shadow"),
               "Seconds a shadow call took (off the request path).", SECONDS_BUCKETS),
    MetricSpec("matih_batch_rows", "histogram", ("model",),
               "Rows in one batched model call (requests stacked by @serve.batch or the slow-model queue).",
               ROWS_BUCKETS),
    MetricSpec("matih_batch_requests", "histogram", ("model",),
               "Requests stacked into one batched model call.", REQUESTS_BUCKETS),
    MetricSpec("matih_model_load_seconds", "histogram", ("model", "model_version", "runtime"),
               "Seconds to load a model version into a replica (resolve, fetch, open, warm up).",
               LOAD_SECONDS_BUCKETS),
    MetricSpec("matih_models_loaded", "gauge", ("where",),
               "Models held by one replica now (where: gateway | model_server | model_server_gpu)."),
    MetricSpec("matih_prediction_log_dropped_total", "counter", ("endpoint",),
               "Prediction-log records dropped because a replica's buffer was full."),
    MetricSpec("matih_prediction_log_written_total", "counter", ("endpoint",),
               "Prediction-log records written to parquet."),
    MetricSpec("matih_jobs", "gauge", ("kind", "state"),
               "Jobs in the metadata store per kind and state, as the job scheduler last counted them."),
    MetricSpec("matih_job_duration_seconds", "histogram", ("kind", "state"),
               "Seconds from a job's start to its final state (succeeded | failed | cancelled).",
               JOB_SECONDS_BUCKETS),
    MetricSpec("matih_event_outbox_depth", "gauge", (),
               "Events in the outbox not yet published."),
    MetricSpec("matih_events_published_total", "counter", ("sink",),
               "Events the relay published, by sink (kafka | redis)."),
    MetricSpec("matih_feature_stream_rows_total", "counter", ("source",),
               "Rows the StreamIngestor wrote into a push source from its stream."),
    MetricSpec("matih_feature_stream_dead_letters_total", "counter", ("source",),
               "Stream messages the StreamIngestor skipped (not a JSON object, a missing or bad column)."),
    MetricSpec("matih_feature_stream_lag", "gauge", ("source",),
               "Messages of a push source's stream not yet written and committed (Kafka: high watermark - "
               "committed offset, summed over partitions; Redis: the group's lag + pending)."),
    MetricSpec("matih_feature_stream_freshness_seconds", "histogram", ("source",),
               "Seconds from the newest event time of a micro-batch to its write into the online store.",
               SECONDS_BUCKETS),
    MetricSpec("matih_alerts_firing", "gauge", ("endpoint", "rule", "severity"),
               "1 while a monitor's alert rule has an open alert (firing or acknowledged) on an endpoint, 0 once "
               "it resolved (app.monitoring.alerts)."),
)
METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}

# Prometheus scrape config: Ray's exported ``ray_matih_*`` stored as ``matih_*``.
RELABEL_RULE = {"source_labels": ["__name__"], "regex": "ray_(matih_.*)", "target_label": "__name__",
                "replacement": "$1"}

_MAX_TAG_SETS = 10_000  # per metric; past it the cache starts over (a label with runaway values)


class _Registry:
    """The Ray metric objects of this process, and the label dicts handed to them."""

    def __init__(self):
        from ray.util import metrics as ray_metrics

        self.metrics: dict[str, Any] = {}
        for spec in _SPECS:
            if spec.kind == "counter":
                m = ray_metrics.Counter(spec.ray_name, spec.help, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                m = ray_metrics.Gauge(spec.ray_name, spec.help, tag_keys=spec.labels)
            else:
                m = ray_metrics.Histogram(spec.ray_name, spec.help, boundaries=list(spec.buckets),
                                          tag_keys=spec.labels)
            self.metrics[spec.name] = m
        self.requests = self.metrics["matih_requests_total"]
        self.duration = self.metrics["matih_request_duration_seconds"]
        self.tags: dict[str, dict[tuple, dict[str, str]]] = {spec.name: {} for spec in _SPECS}
        self.gauges: dict[tuple[str, tuple], tuple[dict[str, str], float]] = {}
        self.gauge_lock = threading.Lock()
        self.refresher: threading.Thread | None = None
        self.closed = threading.Event()

    def tags_for(self, name: str, values: tuple) -> dict[str, str]:
        cache = self.tags[name]
        tags = cache.get(values)
        if tags is None:
            if len(cache) >= _MAX_TAG_SETS:
                cache.clear()
            tags = dict(zip(METRICS[name].labels, (str(v) for v in values), strict=True))
            cache[values] = tags
        return tags

    def set_gauge(self, name: str, values: tuple, value: float) -> None:
        tags = self.tags_for(name, values)
        self.metrics[name].set(value, tags)
        with self.gauge_lock:
            self.gauges[(name, values)] = (tags, value)
            if self.refresher is None:
                self.refresher = threading.Thread(target=self._refresh, name="matih-metrics-gauges", daemon=True)
                self.refresher.start()

    def gauge_keys(self, name: str) -> list[tuple]:
        with self.gauge_lock:
            return [values for (n, values) in self.gauges if n == name]

    def _refresh(self) -> None:
        """Set every gauge again every half report interval: Ray exports a gauge only while it
        is being set, and drops it after two report intervals without a new value."""
        try:
            import ray

            period = max(ray._config.metrics_report_interval_ms(), 1000) / 2000
        except Exception:  # noqa: BLE001 - an older or newer Ray without this config
            period = 5.0
        while not self.closed.wait(period):
            with self.gauge_lock:
                current = list(self.gauges.items())
            for (name, _), (tags, value) in current:
                self.metrics[name].set(value, tags)


_registry: _Registry | None = None
_registry_lock = threading.Lock()


def _get() -> _Registry | None:
    """This process' metrics, created on first use; None where Ray is not initialized (asked
    again on the next call, so a process that initializes Ray later gets its metrics)."""
    global _registry
    if _registry is not None:
        return _registry
    ray = sys.modules.get("ray")  # never imports Ray: a process without it has no metrics
    if ray is None or not ray.is_initialized():
        return None
    with _registry_lock:
        if _registry is None:
            _registry = _Registry()
    return _registry


def _inc(name: str, values: tuple, count: float) -> None:
    reg = _registry or _get()
    if reg is not None and count > 0:
        reg.metrics[name].inc(count, reg.tags_for(name, values))


def _observe(name: str, values: tuple, value: float) -> None:
    reg = _registry or _get()
    if reg is not None:
        reg.metrics[name].observe(value, reg.tags_for(name, values))


def request(endpoint: str, model: str, version: str, variant: str, protocol: str, code: int, seconds: float) -> None:
    """One prediction request answered with HTTP status ``code`` after ``seconds``."""
    reg = _registry or _get()
    if reg is None:
        return
    # Literal dicts: measured cheaper than looking up cached ones (Ray copies the tags anyway).
    reg.requests.inc(1, {"endpoint": endpoint, "model": model, "model_version": version, "variant": variant,
                         "protocol": protocol, "code": str(code)})
    reg.duration.observe(seconds, {"endpoint": endpoint, "model": model, "model_version": version,
                                   "variant": variant})


def shadow(endpoint: str, shadow: str, outcome: str, seconds: float) -> None:
    """A shadow call of ``endpoint`` ended (``outcome`` ok | error) or was dropped."""
    _inc("matih_shadow_requests_total", (endpoint, shadow, outcome), 1)
    if outcome != "dropped":
        _observe("matih_shadow_duration_seconds", (endpoint, shadow), seconds)


def batch(model: str, rows: int, requests: int) -> None:
    """One batched model call of ``requests`` requests holding ``rows`` rows."""
    reg = _registry or _get()
    if reg is None:
        return
    tags = reg.tags_for("matih_batch_rows", (model,))
    reg.metrics["matih_batch_rows"].observe(rows, tags)
    reg.metrics["matih_batch_requests"].observe(requests, tags)


def model_loaded(model: str, version: str, runtime: str, seconds: float) -> None:
    """A model version was loaded into a replica, taking ``seconds``."""
    _observe("matih_model_load_seconds", (model, version, runtime), seconds)


def models_resident(where: str, count: int) -> None:
    """How many models a replica (``where``: gateway | model_server | model_server_gpu) holds now."""
    reg = _registry or _get()
    if reg is not None:
        reg.set_gauge("matih_models_loaded", (where,), count)


def predlog_dropped(endpoint: str, count: int) -> None:
    """Prediction-log records dropped because a replica's buffer was full."""
    _inc("matih_prediction_log_dropped_total", (endpoint,), count)


def predlog_written(endpoint: str, count: int) -> None:
    """Prediction-log records written to parquet."""
    _inc("matih_prediction_log_written_total", (endpoint,), count)


def job_finished(kind: str, state: str, seconds: float) -> None:
    """A job reached a final state (succeeded, failed, cancelled) after running ``seconds``."""
    _observe("matih_job_duration_seconds", (kind, state), max(seconds, 0.0))


def _set_all(name: str, values: dict[tuple, float]) -> None:
    """Gauge ``name`` now holds exactly ``values``: a series set before and absent now reads 0."""
    reg = _registry or _get()
    if reg is None:
        return
    for key in reg.gauge_keys(name):
        if key not in values:
            reg.set_gauge(name, key, 0)
    for key, value in values.items():
        reg.set_gauge(name, key, value)


def jobs_in_state(counts: dict[tuple[str, str], int]) -> None:
    """The number of jobs per (kind, state) now; a (kind, state) counted before and absent
    from ``counts`` reads 0."""
    _set_all("matih_jobs", counts)


def outbox_depth(count: int) -> None:
    """Events in the outbox not yet published."""
    reg = _registry or _get()
    if reg is not None:
        reg.set_gauge("matih_event_outbox_depth", (), count)


def events_published(sink: str, count: int) -> None:
    """Events the relay published to ``sink``."""
    _inc("matih_events_published_total", (sink,), count)


def feature_stream_batch(source: str, rows: int, dead: int, lag: int | None, freshness_s: float | None) -> None:
    """One micro-batch of the StreamIngestor written and committed for push source ``source``."""
    _inc("matih_feature_stream_rows_total", (source,), rows)
    _inc("matih_feature_stream_dead_letters_total", (source,), dead)
    if freshness_s is not None:
        _observe("matih_feature_stream_freshness_seconds", (source,), max(freshness_s, 0.0))
    reg = _registry or _get()
    if reg is not None and lag is not None:
        reg.set_gauge("matih_feature_stream_lag", (source,), lag)


def alerts_firing(open_alerts: dict[tuple[str, str, str], int]) -> None:
    """The open alerts now, per (endpoint, rule, severity) -> 1; one set before and absent
    from ``open_alerts`` reads 0 (resolved)."""
    _set_all("matih_alerts_firing", open_alerts)
