"""The ``triton`` runtime: serves a model that lives on a remote Triton Inference Server (or
any server speaking the Open Inference Protocol), over HTTP through ``tritonclient.http`` or
over gRPC through ``tritonclient.grpc`` (``config.protocol``).

Nothing is loaded locally (``needs_artifact = False``): ``load`` asks the remote server for
the model's readiness and metadata and takes the signature from there; ``predict`` sends the
float32 matrix as binary tensor data (raw contents over gRPC). The endpoint's runtime config
(:class:`TritonConfig`) says where and how.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import Field, field_validator

from app.errors import (
    DependencyUnavailable,
    InvalidInput,
    MatihError,
    ModelError,
    NotFound,
)
from app.runtimes.base import ModelRuntime, RuntimeConfig
from app.serving.signature import ModelSignature
from app.settings import TritonRuntimeSettings

log = logging.getLogger(__name__)

# The host part of config.url: a DNS name, IPv4 or [IPv6] address, with an optional port. Stricter
# than any URL parser, so that the host checked against the allow-list is the host connected to.
_HOST = re.compile(r"^[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_.])?(?::\d{1,5})?$|^\[[0-9a-f:.]+\](?::\d{1,5})?$", re.I)


class TritonConfig(RuntimeConfig):
    """Options of the ``triton`` runtime: where the remote V2 server is and what to call there."""

    url: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description="host:port[/base-path] of the Triton (or any V2) server, e.g. triton:8000 (HTTP) or "
        "triton:8001 (gRPC, no base path); http:// is accepted and https:// turns on TLS.",
    )
    protocol: Literal["http", "grpc"] = Field(
        "http",
        description="How to call the server: 'http' (the V2 REST protocol, tritonclient.http) or 'grpc' "
        "(inference.GRPCInferenceService, tritonclient.grpc). Without a port in url, gRPC connects to 443.",
    )
    model_name: str | None = Field(None, min_length=1, description="The model on the server. Default: the registered model's name.")
    model_version: str | None = Field(None, description="The version on the server. Default: the server's own choice.")
    input_name: str | None = Field(
        None, min_length=1, description="The input to feed. Default: the model's only input (needed when it has several)."
    )
    label_output: str | None = Field(None, min_length=1, description="The output read as predictions. Default: the one named label*.")
    probabilities_output: str | None = Field(
        None, min_length=1, description="The output read as class probabilities. Default: the one named *prob*."
    )
    timeout_s: float = Field(30.0, gt=0, description="Connection and network timeout of every call, in seconds.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        repr=False,  # credentials: never in a log line
        description='Extra HTTP headers (gRPC metadata, keys lower-cased) on every call, e.g. '
        '{"Authorization": "Bearer ..."}.'
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip()
        scheme, sep, rest = v.partition("://")
        if sep and scheme.lower() not in ("http", "https"):
            raise ValueError(f"the scheme must be http:// or https:// (or none), not {scheme}://")
        if not (rest if sep else v):
            raise ValueError("give host:port of the server, e.g. triton:8000")
        return v

    @field_validator("model_version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _allowed(entry: str) -> tuple[str, int | None]:
    """(host, port or None for any) of an entry of runtimes.triton.allowed_hosts (checked by the settings)."""
    parts = urlsplit(f"//{entry}")
    return (parts.hostname or "").rstrip("."), parts.port


def _host_port(url: str, protocol: str = "http") -> tuple[str, int]:
    """(lower-case host, port) of config.url, ``[scheme://][user@]host[:port][/path]``; without
    a port, the one tritonclient connects to: 443 for https and for gRPC (gRPC's default), else 80."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "http", url
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo, at, hostport = authority.rpartition("@")
    if not _HOST.match(hostport) or any(c in userinfo for c in "\\ "):
        raise InvalidInput(
            "config.url must be [http(s)://]host[:port][/base-path] with a DNS name or IP address as host, "
            "e.g. triton.ml.svc:8000",
            details={"field": "config.url"},
        )
    parts = urlsplit(f"//{hostport}")
    try:
        port = parts.port
    except ValueError:
        raise InvalidInput("config.url has a port outside 1-65535", details={"field": "config.url"}) from None
    if port is None:
        port = 443 if scheme.lower() == "https" or protocol == "grpc" else 80
    return (parts.hostname or "").rstrip("."), port


# A gRPC status as the HTTP status its failure means here (google.rpc.Code's HTTP mapping), so
# that both protocols' failures become the same platform errors.
_HTTP_OF_GRPC = {
    "NOT_FOUND": "404", "INVALID_ARGUMENT": "400", "OUT_OF_RANGE": "400", "FAILED_PRECONDITION": "400",
    "UNAUTHENTICATED": "401", "PERMISSION_DENIED": "403", "RESOURCE_EXHAUSTED": "429",
    "UNIMPLEMENTED": "501", "INTERNAL": "500", "UNKNOWN": "500", "DATA_LOSS": "500",
}


class TritonModelRuntime(ModelRuntime):
    name = "triton"
    Config = TritonConfig
    config: TritonConfig
    needs_artifact = False
    blocking_io = True

    def __init__(self, config: TritonConfig | dict[str, Any] | None = None, settings=None):
        super().__init__(config, settings)
        url = self.config.url
        self._ssl = url.lower().startswith("https://")
        self.url = url.split("://", 1)[1] if "://" in url else url
        # The URL as messages show it: user info (credentials) in it is masked.
        self._shown_url = re.sub(r"^[^/?#]*@", "***@", self.url)
        self._grpc = self.config.protocol == "grpc"
        # gRPC metadata keys must be lower case; HTTP header names are case-insensitive anyway.
        headers = {k.lower(): v for k, v in self.config.headers.items()} if self._grpc else dict(self.config.headers)
        self._headers = headers or None
        self._timeout = self.config.timeout_s
        self.model_version = self.config.model_version or ""
        # The model's name on the remote server (not ``model_name``: the base class's, which the
        # loader sets to the registered model's name for the metrics labels after load).
        self.remote_name: str | None = self.config.model_name
        # A tritonclient.http client works only in the thread that made it (gevent), and the
        # ModelServer calls load and predict from different worker threads: one client each
        # (a gRPC channel could be shared; one per thread keeps the two protocols alike).
        self._local = threading.local()

    @classmethod
    def check_config(cls, config: TritonConfig, settings) -> None:  # type: ignore[override]
        """config.url must name a host on ``runtimes.triton.allowed_hosts`` (empty: none is), and
        config.timeout_s stay within ``runtimes.triton.max_timeout_s``."""
        limits = settings.runtimes.triton if settings is not None else TritonRuntimeSettings()
        host, port = _host_port(config.url, config.protocol)
        if config.protocol == "grpc" and re.search(r"[/?#]", config.url.split("://", 1)[-1]):
            raise InvalidInput(
                "config.url: a gRPC server is host:port, without a path (services are not mounted under one)",
                details={"field": "config.url"},
            )
        allowed = [_allowed(entry) for entry in limits.allowed_hosts]
        if not any(h == host and p in (None, port) for h, p in allowed):
            where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            listed = (
                f"it holds {', '.join(limits.allowed_hosts)}" if limits.allowed_hosts
                else "it is empty, so every remote URL is refused"
            )
            raise InvalidInput(
                f"config.url: the triton runtime may not call {where}: it is not on the setting "
                f"runtimes.triton.allowed_hosts ({listed}); an operator adds the server there",
                code="host_not_allowed",
                details={"field": "config.url", "setting": "runtimes.triton.allowed_hosts"},
            )
        if config.timeout_s > limits.max_timeout_s:
            raise InvalidInput(
                f"config.timeout_s is {config.timeout_s:g} s; at most {limits.max_timeout_s:g} s "
                "(the setting runtimes.triton.max_timeout_s)",
                details={"field": "config.timeout_s", "setting": "runtimes.triton.max_timeout_s"},
            )

    # -- remote calls ----------------------------------------------------------------------
    def _module(self):
        """tritonclient.grpc or tritonclient.http: the same client API, InferInput and
        InferRequestedOutput in both."""
        if self._grpc:
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._module()
            if self._grpc:
                client = module.InferenceServerClient(self.url, ssl=self._ssl)
            else:
                client = module.InferenceServerClient(
                    self.url,
                    connection_timeout=self._timeout,
                    network_timeout=self._timeout,
                    ssl=self._ssl,
                )
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        client, self._local.client = getattr(self._local, "client", None), None
        if client is not None and self._grpc:  # a gRPC channel holds a thread and sockets until closed
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken channel may fail; it is dropped either way
                pass

    def _kw(self, **kwargs: Any) -> dict[str, Any]:
        """Keyword arguments of every call: the headers, and over gRPC the call's deadline
        (tritonclient.http takes its timeouts when the client is made)."""
        kwargs["headers"] = self._headers
        if self._grpc:
            kwargs["client_timeout"] = self._timeout
        return kwargs

    def _where(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"model {self.remote_name!r}{version} on the Triton server at {self._shown_url}"

    def _call(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` against the server; a failure becomes a platform error whose
        message is ours (what failed, the status, what to check), never the remote server's
        text: that goes to this replica's log only, shortened."""
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if status.startswith("StatusCode."):  # tritonclient.grpc: the gRPC status code's name
                status = status.removeprefix("StatusCode.")
                if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):  # not reached, or no answer in time
                    self._drop_client()
                    log.warning("%s of %s failed: %s %.300r", what, self._where(), status, exc.message())
                    raise DependencyUnavailable(
                        f"{what} of {self._where()} failed: the server could not be reached or did not answer in "
                        f"{self._timeout:g} s ({status})"
                    ) from None
                status = _HTTP_OF_GRPC.get(status, "500") + f" ({status})"
            log.warning("%s of %s failed (%s); the server said: %.300r", what, self._where(), status, exc.message())
            failed = f"{what} of {self._where()} failed: the server answered {status or 'with no status'}"
            if status.startswith("404"):
                raise NotFound(
                    f"{failed} (no such model or version); check the endpoint's config.model_name and "
                    "config.model_version",
                    details={"remote_status": 404},
                ) from None
            if status[:3] in ("400", "422"):
                raise InvalidInput(f"{failed} (it refused the request)", details={"remote_status": int(status[:3])}) from None
            if status[:3] in ("401", "403"):
                raise DependencyUnavailable(
                    f"{failed} (it refused the credentials); set config.headers to credentials the server accepts"
                ) from None
            if status.startswith("5") and status[:3] not in ("502", "503", "504"):
                raise ModelError(f"{failed} (a server error)") from None
            self._drop_client()  # the connection may be broken: make a fresh client next time
            raise DependencyUnavailable(failed) from None
        except MatihError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused connections, DNS, timeouts (socket, gevent)
            self._drop_client()
            log.warning("%s of %s failed: %.300r", what, self._where(), exc)
            raise DependencyUnavailable(
                f"{what} of {self._where()} failed: the server could not be reached or did not answer in "
                f"{self._timeout:g} s ({type(exc).__name__})"
            ) from None

    # -- the runtime interface -------------------------------------------------------------
    def load(self, model_dir: Path | None, metadata: dict[str, Any]) -> None:
        if not self.remote_name:
            registered = str(metadata.get("model_name") or metadata.get("model") or "")
            self.remote_name = registered.rpartition("/")[0] if "/" in registered else registered
        if not self.remote_name:
            raise InvalidInput("the triton runtime needs config.model_name", details={"field": "config.model_name"})
        client = self._client()
        kw = self._kw(model_version=self.model_version)
        meta_kw = {**kw, "as_json": True} if self._grpc else kw  # the dict form, as tritonclient.http answers
        meta = self._call("reading the metadata", client.get_model_metadata, self.remote_name, **meta_kw)
        if not self._call("the readiness check", client.is_model_ready, self.remote_name, **kw):
            raise DependencyUnavailable(f"{self._where()} is not ready; load it on the server first")

        inputs = meta.get("inputs") or []
        wanted = self.config.input_name
        if wanted:
            inp = next((i for i in inputs if i.get("name") == wanted), None)
            if inp is None:
                raise InvalidInput(
                    f"config.input_name {wanted!r} is not an input of {self._where()}; it has "
                    f"{[i.get('name') for i in inputs]}",
                    details={"field": "config.input_name"},
                )
        elif len(inputs) == 1:
            inp = inputs[0]
        else:
            raise ModelError(
                f"{self._where()} has {len(inputs)} inputs; the triton runtime feeds one matrix "
                "[rows, n_features]: set config.input_name"
            )
        from tritonclient.utils import triton_to_np_dtype

        self._input_name = inp["name"]
        self._input_datatype = inp.get("datatype", "FP32")
        if self._input_datatype in ("BYTES", "BOOL", "BF16") or triton_to_np_dtype(self._input_datatype) is None:
            raise ModelError(f"input {self._input_name!r} of {self._where()} is {self._input_datatype}, not numeric")
        self._input_dtype = np.dtype(triton_to_np_dtype(self._input_datatype))
        shape = inp.get("shape") or []  # over gRPC the dict form has int64s as strings: int() takes both
        n_features = int(shape[-1]) if len(shape) == 2 and int(shape[-1]) > 0 else None

        outputs = [o["name"] for o in meta.get("outputs") or []]
        if not outputs:
            raise ModelError(f"{self._where()} declares no outputs")
        self._label_out = self.config.label_output or next(
            (o for o in outputs if o.lower().startswith("label")), outputs[0]
        )
        self._proba_out = self.config.probabilities_output or next(
            (o for o in outputs if "prob" in o.lower() and o != self._label_out), None
        )
        names = metadata.get("feature_names")
        self.signature = ModelSignature(
            n_features=n_features,
            feature_names=names if names and (n_features is None or len(names) == n_features) else None,
            task=metadata.get("task"),
            classes=metadata.get("classes"),
            extra={"remote": self._shown_url, "remote_model": self.remote_name, "remote_versions": meta.get("versions")},
        )
        self.ready = True

    def predict(self, features: np.ndarray, *, probabilities: bool = False) -> dict[str, Any]:
        module = self._module()
        binary = {} if self._grpc else {"binary_data": True}  # gRPC tensors are always raw bytes
        data = np.ascontiguousarray(features, dtype=self._input_dtype)
        inp = module.InferInput(self._input_name, list(data.shape), self._input_datatype)
        inp.set_data_from_numpy(data, **binary)
        wanted = [self._label_out]
        if probabilities and self._proba_out:
            wanted.append(self._proba_out)
        outputs = [module.InferRequestedOutput(name, **binary) for name in wanted]
        client = self._client()
        result = self._call(
            "inference",
            client.infer,
            self.remote_name,
            [inp],
            **self._kw(model_version=self.model_version, outputs=outputs),
        )
        preds = result.as_numpy(self._label_out)
        if preds is None:
            raise ModelError(f"{self._where()} returned no output {self._label_out!r}")
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.dtype == object:
            preds = np.asarray([v.decode("utf-8") if isinstance(v, bytes) else v for v in preds.ravel()], dtype=object)
        out: dict[str, Any] = {"predictions": preds.tolist()}
        if len(wanted) > 1:
            proba = result.as_numpy(self._proba_out)
            if proba is not None:
                out["probabilities"] = np.asarray(proba, dtype=np.float64).tolist()
        return out
