"""Platform metrics through Ray's metrics system (``ray.util.metrics``), exported on Ray's
Prometheus endpoint beside Ray Serve's ``ray_serve_*`` series. Names follow Prometheus
conventions: ``matih_`` prefix, ``_total`` for counters, ``_seconds`` for durations.

Callers use the functions below; each is cheap (no allocation per call beyond Ray's own) and
a no-op in a process where Ray is not initialized (unit tests, the CLI).

SKELETON: the bodies are filled in by the metrics work of issue 12; the signatures are the
contract the serving path, the prediction log, the job scheduler and the event relay call.
"""

from __future__ import annotations


def request(endpoint: str, model: str, version: str, variant: str, protocol: str, code: int, seconds: float) -> None:
    """One prediction request answered with HTTP status ``code`` after ``seconds``."""


def batch(model: str, rows: int, requests: int) -> None:
    """One batched model call of ``requests`` requests holding ``rows`` rows."""


def model_loaded(model: str, version: str, runtime: str, seconds: float) -> None:
    """A model version was loaded into a replica, taking ``seconds``."""


def models_resident(where: str, count: int) -> None:
    """How many models a replica (``where``: gateway | model_server | model_server_gpu) holds now."""


def predlog_dropped(endpoint: str, count: int) -> None:
    """Prediction-log records dropped because a replica's buffer was full."""


def predlog_written(endpoint: str, count: int) -> None:
    """Prediction-log records written to parquet."""


def job_finished(kind: str, state: str, seconds: float) -> None:
    """A job reached a final state (succeeded, failed, cancelled) after running ``seconds``."""


def jobs_in_state(counts: dict[tuple[str, str], int]) -> None:
    """The number of jobs per (kind, state) now."""


def outbox_depth(count: int) -> None:
    """Events in the outbox not yet published."""


def events_published(sink: str, count: int) -> None:
    """Events the relay published to ``sink``."""
