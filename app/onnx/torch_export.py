"""Torch models as ONNX (``torch.onnx.export``, TorchScript exporter, opset 17), and the
parity check between the two: a training job's trained zoo model (``export_onnx``, from
``app.training.pipeline``) and an uploaded TorchScript module (``export_torchscript``, from
``app.registry.formats``).

Imports torch at import time; callers import this module where they need it.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnx


class TrainedData(Protocol):
    """What ``export_onnx`` reads of a training job's data (``app.training.data.PreparedData``)."""

    X_train: np.ndarray
    X_holdout: np.ndarray
    task: str
    classes: list

    @property
    def n_features(self) -> int: ...


def _label_kind(classes: list) -> str:
    """How an exported classifier's ``label`` output holds the classes: "int" (the integer
    classes themselves), "string" (the string classes, through an ONNX-ML LabelEncoder) or
    "index" (class indices: booleans, which compare equal to 0 and 1, and mixed types)."""
    if all(isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, (bool, np.bool_))
           and float(c).is_integer() for c in classes):
        return "int"
    if all(isinstance(c, str) for c in classes):
        return "string"
    return "index"


class _OnnxClassifier(nn.Module):
    """Outputs what validation and the ONNX serving runtime read: ``label`` first,
    ``probabilities`` (softmax of the logits) second."""

    def __init__(self, inner: nn.Module, classes: list):
        super().__init__()
        self.inner = inner
        values = [int(c) for c in classes] if _label_kind(classes) == "int" else list(range(len(classes)))
        self.register_buffer("labels", torch.tensor(values, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.inner(x)
        return self.labels[torch.argmax(z, dim=1)], torch.softmax(z, dim=1)


def _string_labels(proto: onnx.ModelProto, classes: list[str]) -> None:
    """Turn the int64 ``label`` output into the string classes (torch cannot emit strings)."""
    from onnx import TensorProto, helper

    graph = proto.graph
    for node in graph.node:
        node.output[:] = ["label_index" if name == "label" else name for name in node.output]
    graph.node.append(helper.make_node(
        "LabelEncoder", ["label_index"], ["label"], domain="ai.onnx.ml", name="classes",
        keys_int64s=list(range(len(classes))), values_strings=list(classes), default_string="",
    ))
    next(o for o in graph.output if o.name == "label").type.tensor_type.elem_type = TensorProto.STRING
    proto.opset_import.append(helper.make_opsetid("ai.onnx.ml", 2))


def export_onnx(model: nn.Module, data: TrainedData) -> tuple[onnx.ModelProto, float]:
    """ONNX (opset 17, input ``input`` with a dynamic batch axis) of a trained zoo model, and
    the largest |ONNX - torch| difference on the holdout rows (class probabilities, or
    predictions for a regression). Classifiers output ``label`` and ``probabilities``;
    ``label`` holds the original classes when they are integers or strings (the model's
    metadata ``matih.label_output`` is then "classes"), else class indices ("index", which
    the caller maps). Regressors output ``variable`` ([N, 1])."""
    import onnx
    import onnxruntime as ort

    model = model.to("cpu").eval()
    width = data.n_features
    if data.task == "classification":
        target: nn.Module = _OnnxClassifier(model, data.classes).eval()
        names = ["label", "probabilities"]
    else:
        target, names = model, ["variable"]
    buf = io.BytesIO()
    # Traced with autograd on: under no_grad an eval-mode TransformerEncoderLayer takes its fused
    # fast path (aten::_transformer_encoder_layer_fwd), which has no ONNX export.
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter about the TorchScript exporter
        torch.onnx.export(
            target, (torch.zeros(2, width),), buf, dynamo=False, input_names=["input"], output_names=names,
            dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}}, opset_version=17,
        )
    proto = onnx.load_from_string(buf.getvalue())
    if data.task == "classification":
        kind = _label_kind(data.classes)
        if kind == "string":
            _string_labels(proto, data.classes)
            onnx.checker.check_model(proto)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "matih.label_output", "index" if kind == "index" else "classes"

    X = np.ascontiguousarray(data.X_holdout if len(data.X_holdout) else data.X_train[:64], dtype=np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": X})
    with torch.no_grad():
        reference = model(torch.from_numpy(X))
    if data.task == "classification":
        expected = torch.softmax(reference, dim=1).numpy()
        got = outs[1]
    else:
        expected, got = reference.numpy().reshape(-1), np.asarray(outs[0]).reshape(-1)
    return proto, float(np.max(np.abs(np.asarray(got, dtype=np.float64) - expected))) if len(X) else 0.0


def export_torchscript(module, width: int, task: str):
    """An uploaded TorchScript ``module`` as ONNX, via the TorchScript exporter (``dynamo=False``: the dynamo exporter needs
    onnxscript and does not take ScriptModules). Classifiers get ``label`` (argmax) and
    ``probabilities`` (softmax of the scores) outputs."""
    import onnx

    class _Classifier(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            z = self.inner(x)
            return torch.argmax(z, dim=1), torch.softmax(z, dim=1)

    target = torch.jit.script(_Classifier(module)) if task == "classification" else module
    names = ["label", "probabilities"] if task == "classification" else ["variable"]
    buf = io.BytesIO()
    with warnings.catch_warnings():  # "no signature found for ScriptMethod": expected for ScriptModules
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            target,
            (torch.zeros(2, width),),
            buf,
            dynamo=False,
            input_names=["input"],
            output_names=names,
            dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=17,
        )
    return onnx.load_from_string(buf.getvalue())


def torchscript_parity(model, X: np.ndarray, reference: np.ndarray, is_classifier: bool) -> tuple[float, float]:
    """(max |ONNX - torch|, share of equal labels) of ``export_torchscript``'s ``model`` on
    ``X``, given the module's own outputs ``reference`` on ``X`` (scores per class, compared as
    softmax probabilities, or one value per row)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": X.astype(np.float32)})
    if is_classifier:
        shifted = reference - reference.max(axis=1, keepdims=True)
        proba = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        max_diff = float(np.max(np.abs(outs[1] - proba)))
        agreement = float(np.mean(outs[0].reshape(-1) == reference.argmax(axis=1)))
    else:
        max_diff = float(np.max(np.abs(outs[0].reshape(-1) - reference.reshape(-1))))
        agreement = 1.0
    return max_diff, agreement
