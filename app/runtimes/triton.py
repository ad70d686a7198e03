"""The ``triton`` runtime: serves a model that lives on a remote Triton Inference Server (or
any server speaking the Open Inference Protocol over HTTP), through ``tritonclient.http``.

Nothing is loaded locally (``needs_artifact = False``): ``load`` asks the remote server for
the model's readiness and metadata and takes the signature from there; ``predict`` sends the
float32 matrix as binary tensor data. The endpoint's runtime config (:class:`TritonConfig`)
says where.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

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


class TritonConfig(RuntimeConfig):
    """Options of the ``triton`` runtime: where the remote V2 server is and what to call there."""

    url: str = Field(
        ...,
        min_length=1,
        description="host:port[/base-path] of the Triton (or any V2 HTTP) server, e.g. triton:8000; "
        "http:// is accepted and https:// turns on TLS.",
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
        description='Extra HTTP headers on every call, e.g. {"Authorization": "Bearer ..."}.'
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
        self._headers = dict(self.config.headers) or None
        self._timeout = self.config.timeout_s
        self.model_version = self.config.model_version or ""
        self.model_name: str | None = self.config.model_name
        # A tritonclient.http client works only in the thread that made it (gevent), and the
        # ModelServer calls load and predict from different worker threads: one client each.
        self._local = threading.local()

    # -- remote calls ----------------------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(
                self.url,
                connection_timeout=self._timeout,
                network_timeout=self._timeout,
                ssl=self._ssl,
            )
            self._local.client = client
        return client

    def _where(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"model {self.model_name!r}{version} on the Triton server at {self.url}"

    def _call(self, what: str, fn, *args, **kwargs):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, **kwargs)
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            message = f"{what} of {self._where()} failed ({status or 'no status'}): {exc.message()}"
            if status == "404":
                raise NotFound(f"{message}; check the endpoint's config.model_name", details={"remote_status": 404}) from None
            if status in ("400", "422"):
                raise InvalidInput(message, details={"remote_status": int(status)}) from None
            if status in ("401", "403"):
                raise DependencyUnavailable(f"{message}; set config.headers to credentials the server accepts") from None
            if status.startswith("5") and status not in ("502", "503", "504"):
                raise ModelError(message) from None
            self._local.client = None  # the connection may be broken: make a fresh client next time
            raise DependencyUnavailable(message) from None
        except MatihError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused connections, DNS, timeouts (socket, gevent)
            self._local.client = None
            raise DependencyUnavailable(
                f"{what} of {self._where()} failed: {type(exc).__name__}: {exc}"
            ) from None

    # -- the runtime interface -------------------------------------------------------------
    def load(self, model_dir: Path | None, metadata: dict[str, Any]) -> None:
        if not self.model_name:
            registered = str(metadata.get("model_name") or metadata.get("model") or "")
            self.model_name = registered.rpartition("/")[0] if "/" in registered else registered
        if not self.model_name:
            raise InvalidInput("the triton runtime needs config.model_name", details={"field": "config.model_name"})
        client = self._client()
        kw = {"model_version": self.model_version, "headers": self._headers}
        meta = self._call("reading the metadata", client.get_model_metadata, self.model_name, **kw)
        if not self._call("the readiness check", client.is_model_ready, self.model_name, **kw):
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
        shape = inp.get("shape") or []
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
            extra={"remote": self.url, "remote_model": self.model_name, "remote_versions": meta.get("versions")},
        )
        self.ready = True

    def predict(self, features: np.ndarray, *, probabilities: bool = False) -> dict[str, Any]:
        import tritonclient.http as httpclient

        data = np.ascontiguousarray(features, dtype=self._input_dtype)
        inp = httpclient.InferInput(self._input_name, list(data.shape), self._input_datatype)
        inp.set_data_from_numpy(data, binary_data=True)
        wanted = [self._label_out]
        if probabilities and self._proba_out:
            wanted.append(self._proba_out)
        outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in wanted]
        client = self._client()
        result = self._call(
            "inference",
            client.infer,
            self.model_name,
            [inp],
            model_version=self.model_version,
            outputs=outputs,
            headers=self._headers,
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
