"""The environment a Ray cluster needs for the platform: its ingress mode (``http.ingress``),
where Serve's logs go (``serving.log_to_terminal``) and the periods of its background loops
(``serving.idle``).

Ray Serve reads these from environment variables once, when each of its processes
(controller, proxies, replicas) imports ``ray.serve._private.constants``, and Ray's own
processes (GCS, raylet, workers) read their ``RAY_<name>`` system config when they start; so
the variables must
be in the environment of the processes that start the cluster: ``matih-ml up`` puts them in its
own before it runs ``serve run`` (which starts a local cluster), the test session before
``ray.init``, and an operator in the environment of ``ray start`` on every node of an existing
cluster (``matih-ml ray-env`` prints them). A variable already set in the environment wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from app.settings import Settings

HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
LOG_TO_STDERR = "RAY_SERVE_LOG_TO_STDERR"
# Serve's HTTP ingress (proxy or direct) wraps its app in the middlewares this names: the
# platform's server-issued request ids (app.serving.request_ids).
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
REQUEST_ID_MIDDLEWARES = "app.serving.request_ids.serve_middlewares"


def cluster_env(settings: Settings) -> dict[str, str]:
    """The variables of ``settings.http.ingress``, ``settings.serving.log_to_terminal``, the
    background loops' periods (``settings.serving.idle``) and the request-id middleware."""
    return {**_ingress_env(settings), LOG_TO_STDERR: "1" if settings.serving.log_to_terminal else "0",
            PROXY_CALLBACK: REQUEST_ID_MIDDLEWARES, **settings.serving.idle.cluster_env()}


def _ingress_env(settings: Settings) -> dict[str, str]:
    # Both modes name every variable they depend on, so a cluster started in one mode is not
    # left half in the other by a stray value.
    ingress = settings.http.ingress
    if ingress.mode == "proxy":
        return {HA_PROXY: "0", DIRECT_INGRESS: "0"}
    return {
        HA_PROXY: "1",  # implies direct ingress: each Gateway replica opens its own HTTP / gRPC port
        "RAY_SERVE_HAPROXY_NBTHREAD": str(ingress.haproxy_threads),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(ingress.stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(ingress.metrics_port),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ingress.fallback_http_port),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(ingress.fallback_grpc_port),
    }


def apply_cluster_env(settings: Settings, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put :func:`cluster_env` into ``environ`` (``os.environ`` by default) where not already
    set; returns the variables that are now in effect."""
    environ = os.environ if environ is None else environ
    wanted = cluster_env(settings)
    for key, value in wanted.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in wanted}


def mode_in_effect(environ: Mapping[str, str] | None = None) -> str:
    """The ingress mode an environment selects, as Ray Serve reads it."""
    environ = os.environ if environ is None else environ
    if environ.get(HA_PROXY, "0") == "1":
        return "haproxy"
    if environ.get(DIRECT_INGRESS, "0") == "1":
        return "direct"
    return "proxy"
