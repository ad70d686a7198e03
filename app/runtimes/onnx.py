"""ONNX Runtime: the default, safe serving runtime."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from app.errors import Conflict, ModelError
from app.runtimes.base import ModelRuntime, RuntimeConfig
from app.serving.signature import ModelSignature


@functools.lru_cache(maxsize=1)
def gpu_present() -> bool:
    """True only when an NVIDIA driver and a device visible to this process are really there
    (not merely a CUDA build). Ray hides GPUs from actors that did not ask for one by setting
    CUDA_VISIBLE_DEVICES to an empty string, so CPU replicas never pick the CUDA provider."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    if not os.path.exists("/proc/driver/nvidia/version") and not os.environ.get("NVIDIA_VISIBLE_DEVICES"):
        return False
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


def available_providers() -> list[str]:
    """Execution providers to ask for: CUDA only where a GPU really exists, so ONNX Runtime
    never logs a failed provider load on CPU-only machines."""
    import onnxruntime as ort

    built = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in built and gpu_present():
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


def session_options(intra_op_threads: int = 1, inter_op_threads: int = 1):
    """The ONNX Runtime session options of every platform session (serving runtime, batch
    predictors, the benchmarks' in-process references): the thread counts given, all graph
    optimisations, warnings and errors only in the log. 0 threads: ONNX Runtime's default
    (one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = int(inter_op_threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def find_onnx_file(model_dir: Path) -> Path:
    """The model's ONNX graph: ``model.onnx`` (what ``mlflow.onnx`` writes) before any other
    ``.onnx`` file, since an ensemble version also holds ``combiner.onnx``."""
    candidates = sorted(model_dir.rglob("*.onnx"), key=lambda p: (p.name != "model.onnx", len(p.parts), str(p)))
    if not candidates:
        raise ModelError(f"no .onnx file in the model artifacts at {model_dir}")
    return candidates[0]


class OnnxConfig(RuntimeConfig):
    """Options of the ``onnx`` runtime: the ONNX Runtime session of this endpoint's model."""

    intra_op_threads: int | None = Field(
        None, ge=0, description="Intra-op threads of the session (0: one per core). Default: serving.onnx_intra_op_threads."
    )
    inter_op_threads: int | None = Field(
        None, ge=0, description="Inter-op threads of the session (0: ONNX Runtime's default). Default: serving.onnx_inter_op_threads."
    )


class OnnxModelRuntime(ModelRuntime):
    name = "onnx"
    Config = OnnxConfig
    config: OnnxConfig

    def load(self, model_dir: Path, metadata: dict[str, Any]) -> None:
        import onnxruntime as ort

        if "onnx" not in metadata.get("formats", ["onnx"]):
            raise Conflict(
                f"model {metadata.get('model', '')} is {metadata.get('format')} and has no ONNX artifact; serve it "
                "with runtime 'native' (pickle-based versions only after an admin trusts them) or POST "
                ".../convert to make an ONNX version",
                code="no_onnx_artifact",
                details={"format": metadata.get("format")},
            )
        path = find_onnx_file(Path(model_dir))
        opts = session_options(
            self.serving_default(self.config.intra_op_threads, "onnx_intra_op_threads"),
            self.serving_default(self.config.inter_op_threads, "onnx_inter_op_threads"),
        )
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=available_providers())
        except Exception as exc:
            raise ModelError(f"ONNX Runtime could not load {path.name}: {exc}") from None
        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        shape = inp.shape
        n_features = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._label_out = next((o for o in self._outputs if o.lower().startswith("label")), self._outputs[0])
        self._proba_out = next((o for o in self._outputs if "prob" in o.lower()), None)
        self.signature = ModelSignature(
            n_features=n_features,
            feature_names=metadata.get("feature_names"),
            task=metadata.get("task"),
            classes=metadata.get("classes"),
        )
        self.ready = True

    def predict(self, features: np.ndarray, *, probabilities: bool = False) -> dict[str, Any]:
        wanted = [self._label_out]
        if probabilities and self._proba_out:
            wanted.append(self._proba_out)
        try:
            outs = self.session.run(wanted, {self._input_name: features})
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed to predict: {exc}") from None
        preds = outs[0]
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        result: dict[str, Any] = {"predictions": preds.tolist()}
        if len(outs) > 1:
            result["probabilities"] = np.asarray(outs[1]).tolist()
        return result
