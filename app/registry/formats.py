"""Model formats a registration accepts, how each is checked, and how it becomes ONNX.

ONNX is the serving default. Every registered version is stored as an MLflow model
directory (an ``MLmodel`` file plus files); what it holds is recorded in its tags:

| format | checked at registration | ONNX | native runtime |
| --- | --- | --- | --- |
| ``onnx`` | ``onnx.checker``; no external data; one float input of shape (batch, n); a run in ONNX Runtime on generated rows | the file itself | - |
| ``skops`` | loaded with ``skops.io`` trusting only skops' defaults plus ``registry.skops_trusted_types`` (anything else: 422) | skl2onnx + parity on generated rows | yes |
| ``torchscript`` | ``torch.jit.load`` (never ``torch.load``) | ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``) + parity | yes |
| ``sklearn-pickle`` | **never loaded**: stored as bytes; the globals it would import are listed (``pickletools``, which parses and runs nothing) | after an admin trusts it: ``POST .../convert`` | only when trusted |

Parity compares ONNX Runtime with the original on rows drawn from a fixed seed (width from
the model: ``n_features_in_`` for scikit-learn, the first 2-D weight or ``n_features`` for
TorchScript). A conversion that fails or differs beyond ``jobs.onnx_parity_tolerance``
keeps the version native-only with ``matih.validation=failed``; a version that has ONNX
and passed carries ``matih.validation=passed``, which production requires.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import Conflict, InvalidInput, ModelError
from app.registry.mlflow_registry import (
    TAG_CLASSES,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_PARITY,
    TAG_TASK,
    TAG_TRUSTED,
    TAG_VALIDATION,
)
from app.registry.paths import check_relative_path
from app.settings import Settings

FORMATS = ("onnx", "skops", "sklearn-pickle", "torchscript")
PICKLE_FORMATS = frozenset({"sklearn-pickle"})
NATIVE_FLAVOR = "matih_native"
NATIVE_FILES = {"skops": "model.skops", "sklearn-pickle": "model.pkl", "torchscript": "model.pt"}
TAG_VALIDATION_DETAIL = "matih.validation_detail"
TAG_PICKLE_GLOBALS = "matih.pickle_globals"
TAG_SKOPS_TYPES = "matih.skops_trusted_types"
TAG_CONVERSION_ERROR = "matih.conversion_error"
PARITY_ROWS = 32
_TAG_MAX = 4000


@dataclass
class Hints:
    """Facts the caller may give about an uploaded model (the file may not say them)."""

    n_features: int | None = None
    task: str | None = None  # classification | regression
    feature_names: list[str] | None = None
    classes: list[Any] | None = None


@dataclass
class PreparedModel:
    """An MLflow model directory ready to be logged, with the tags it registers under."""

    model_dir: Path
    format: str
    formats: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def check_format(value: str | None) -> str:
    if value not in FORMATS:
        raise InvalidInput(
            f"format {value!r} is not one of {', '.join(FORMATS)}; say which format the file is in",
            details={"field": "format"},
        )
    return value


def _short(text: str, limit: int = _TAG_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sample_rows(n_features: int, rows: int = PARITY_ROWS) -> np.ndarray:
    """Rows of width ``n_features`` from a fixed seed, exactly representable in float32 so that
    ONNX (float32) and the original (float64) see the same values."""
    rng = np.random.default_rng(0)
    return rng.normal(size=(rows, n_features)).astype(np.float32).astype(np.float64)


# -- MLflow model directories ----------------------------------------------------------------
def _signature(n_features: int | None, sample_out: np.ndarray | None, feature_names: list[str] | None):
    if not n_features:
        return None
    import pandas as pd
    from mlflow.models import infer_signature

    names = feature_names if feature_names and len(feature_names) == n_features else None
    sample = _sample_rows(n_features, 2).astype(np.float32)
    inputs = pd.DataFrame(sample, columns=names) if names else sample
    return infer_signature(inputs, sample_out)


def _write_model_dir(
    dest: Path, onnx_model, native: tuple[str, bytes] | None, signature, native_config: dict[str, Any] | None = None
) -> None:
    """An MLflow model directory: the ONNX flavor when there is ONNX, and the original file
    under ``native/`` described by the ``matih_native`` flavor."""
    import mlflow.onnx
    from mlflow.models import Model

    if onnx_model is not None:
        mlflow.onnx.save_model(
            onnx_model, str(dest), signature=signature, pip_requirements=["onnxruntime"], save_as_external_data=False
        )
        model = Model.load(str(dest / "MLmodel"))
    else:
        dest.mkdir(parents=True)
        model = Model(signature=signature)
    if native is not None:
        fmt, data = native
        rel = f"native/{NATIVE_FILES[fmt]}"
        (dest / "native").mkdir(exist_ok=True)
        (dest / rel).write_bytes(data)
        model.add_flavor(NATIVE_FLAVOR, format=fmt, path=rel, **(native_config or {}))
    model.save(str(dest / "MLmodel"))


# -- ONNX ------------------------------------------------------------------------------------
def _check_onnx(onnx_model, hints: Hints) -> tuple[int | None, dict[str, str]]:
    """Refuse ONNX models the platform cannot serve safely; run one on generated rows."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        onnx.checker.check_model(onnx_model)
    except Exception as exc:
        raise InvalidInput(f"the ONNX model fails onnx.checker: {exc}", details={"field": "file"}) from None
    if any(uses_external_data(t) for t in _get_all_tensors(onnx_model)):
        raise InvalidInput(
            "the ONNX model keeps tensors in external files, which could point anywhere on the server; "
            "save it with all tensors inside (onnx.save_model(..., save_as_external_data=False))",
            details={"field": "file"},
        )
    try:
        sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidInput(f"ONNX Runtime cannot open the model: {exc}", details={"field": "file"}) from None
    inputs = sess.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 2:
        got = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs)
        raise InvalidInput(
            f"the ONNX model must take one float tensor of shape (batch, n_features); it takes {got}. "
            "Export it with a single float32 input",
            details={"field": "file"},
        )
    width = inputs[0].shape[1]
    n_features = width if isinstance(width, int) else hints.n_features
    if not n_features:
        raise InvalidInput(
            "the ONNX model's input width is symbolic; send n_features with the registration",
            details={"field": "n_features"},
        )
    try:
        outs = sess.run(None, {inputs[0].name: _sample_rows(n_features).astype(np.float32)})
    except Exception as exc:
        raise InvalidInput(
            f"the ONNX model fails on {PARITY_ROWS} rows of width {n_features}: {exc}", details={"field": "file"}
        ) from None
    finite = all(np.all(np.isfinite(np.asarray(o, dtype=np.float64))) for o in outs if np.asarray(o).dtype.kind in "fiu")
    tags = {
        TAG_VALIDATION: "passed" if finite else "failed",
        TAG_VALIDATION_DETAIL: f"onnx.checker passed; ONNX Runtime ran {PARITY_ROWS} generated rows "
        + ("with finite outputs" if finite else "and gave non-finite outputs"),
    }
    names = [o.name.lower() for o in sess.get_outputs()]
    task = hints.task or ("classification" if any("prob" in n for n in names) else None)
    if task:
        tags[TAG_TASK] = task
    return n_features, tags


def prepare_onnx(data: bytes, dest: Path, hints: Hints) -> PreparedModel:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise InvalidInput(f"the file is not an ONNX model: {exc}", details={"field": "file"}) from None
    n_features, tags = _check_onnx(model, hints)
    _write_model_dir(dest, model, None, _signature(n_features, None, hints.feature_names))
    return PreparedModel(dest, "onnx", ["onnx"], {**tags, **_hint_tags(hints)})


# -- scikit-learn ----------------------------------------------------------------------------
def skops_types(data: bytes, settings: Settings) -> list[str]:
    """The types beyond skops' defaults that ``data`` holds, all on the allow-list, or 422."""
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:
        raise InvalidInput(f"the file is not a skops archive: {exc}", details={"field": "file"}) from None
    unknown = sorted(t for t in untrusted if t not in settings.registry.skops_trusted_types)
    if unknown:
        raise InvalidInput(
            f"the skops file holds types that are not trusted: {', '.join(unknown)}. Register the model as "
            "ONNX, or have an operator add the types to registry.skops_trusted_types if the code behind them is trusted",
            code="untrusted_types",
            details={"field": "file", "types": unknown},
        )
    return sorted(untrusted)


def load_skops(data: bytes, trusted: list[str]):
    import skops.io as sio

    try:
        return sio.loads(data, trusted=trusted)
    except Exception as exc:
        raise InvalidInput(f"skops could not load the file: {exc}", details={"field": "file"}) from None


def _check_estimator(est) -> int:
    if not (hasattr(est, "predict") and hasattr(est, "get_params")):
        raise InvalidInput(
            f"the file holds a {type(est).__name__}, not a fitted scikit-learn estimator", details={"field": "file"}
        )
    n = getattr(est, "n_features_in_", None)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidInput(
            f"the {type(est).__name__} is not fitted (no n_features_in_); fit it before saving", details={"field": "file"}
        )
    return int(n)


def _sklearn_facts(est, hints: Hints) -> tuple[bool, dict[str, str]]:
    from sklearn.base import is_classifier

    is_clf = is_classifier(est)
    tags = {TAG_TASK: "classification" if is_clf else "regression"}
    names = getattr(est, "feature_names_in_", None)
    names = [str(n) for n in names] if names is not None else hints.feature_names
    if names:
        tags[TAG_FEATURES] = json.dumps(names)
    if is_clf and hasattr(est, "classes_"):
        tags[TAG_CLASSES] = json.dumps([c.item() if hasattr(c, "item") else c for c in est.classes_])
    return is_clf, tags


def _sklearn_onnx(est, settings: Settings) -> tuple[Any | None, dict[str, str], dict[str, float]]:
    """(ONNX model or None, tags, metrics): skl2onnx conversion and parity on generated rows."""
    from sklearn.base import is_classifier

    from app.onnx.sklearn_export import onnx_parity, to_onnx

    is_clf = is_classifier(est)
    X = _sample_rows(_check_estimator(est))
    try:
        model = to_onnx(est, X, is_clf)
        max_diff, agreement = onnx_parity(model, est, X, is_clf)
    except Exception as exc:  # skl2onnx has no converter, or ONNX Runtime refuses the result
        msg = exc.message if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
        return None, {
            TAG_VALIDATION: "failed",
            TAG_CONVERSION_ERROR: _short(msg),
            TAG_VALIDATION_DETAIL: "no ONNX: the conversion failed; the native runtime can still serve it",
        }, {}
    return _parity_outcome(model, max_diff, agreement, is_clf, est.predict(X), settings)


def _parity_outcome(model, max_diff: float, agreement: float, is_clf: bool, reference, settings: Settings):
    scale = 1.0 if is_clf else max(1.0, float(np.max(np.abs(np.asarray(reference, dtype=np.float64)))))
    tol = settings.jobs.onnx_parity_tolerance
    ok = max_diff <= tol * scale and agreement == 1.0
    detail = (
        f"ONNX parity on {PARITY_ROWS} generated rows: max |diff| {max_diff:.3g} (tolerance {tol} x {scale:.3g}), "
        f"label agreement {agreement:.3f}"
    )
    tags = {TAG_PARITY: repr(max_diff), TAG_VALIDATION: "passed" if ok else "failed", TAG_VALIDATION_DETAIL: detail}
    metrics = {"onnx_max_abs_diff": max_diff, "onnx_label_agreement": agreement}
    if not ok:
        tags[TAG_CONVERSION_ERROR] = "ONNX output differs from the original beyond the tolerance; ONNX not kept"
        return None, tags, metrics
    return model, tags, metrics


def prepare_skops(data: bytes, dest: Path, settings: Settings, hints: Hints) -> PreparedModel:
    types = skops_types(data, settings)
    est = load_skops(data, types)
    n = _check_estimator(est)
    _, facts = _sklearn_facts(est, hints)
    model, tags, metrics = _sklearn_onnx(est, settings)
    names = json.loads(facts[TAG_FEATURES]) if TAG_FEATURES in facts else None
    _write_model_dir(dest, model, ("skops", data), _signature(n, est.predict(_sample_rows(n, 2)), names))
    formats = (["onnx"] if model is not None else []) + ["skops"]
    tags = {**facts, **tags, TAG_SKOPS_TYPES: json.dumps(types)}
    return PreparedModel(dest, "skops", formats, tags, metrics)


def prepare_sklearn_estimator(est, dest: Path, settings: Settings, hints: Hints) -> PreparedModel:
    """ONNX from an estimator already loaded (a trusted pickle); ONNX only, or Conflict."""
    n = _check_estimator(est)
    _, facts = _sklearn_facts(est, hints)
    model, tags, metrics = _sklearn_onnx(est, settings)
    if model is None:
        raise Conflict(
            f"the model cannot become ONNX: {tags.get(TAG_CONVERSION_ERROR)} ({tags.get(TAG_VALIDATION_DETAIL)}); "
            "keep serving it with runtime 'native'",
            details={"validation": tags.get(TAG_VALIDATION_DETAIL)},
        )
    names = json.loads(facts[TAG_FEATURES]) if TAG_FEATURES in facts else None
    _write_model_dir(dest, model, None, _signature(n, est.predict(_sample_rows(n, 2)), names))
    return PreparedModel(dest, "onnx", ["onnx"], {**facts, **tags}, metrics)


# -- pickle: stored, never loaded ------------------------------------------------------------
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickle_globals(data: bytes, limit: int = 200) -> list[str] | None:
    """The ``module.name`` globals a pickle would import, found by parsing its opcodes with
    ``pickletools`` (which executes nothing). Best effort: None when the stream cannot be
    parsed (compressed joblib files); informative only, never a reason to trust a file."""
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in _STRING_OPS:
                strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
            elif name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif name == "STOP":
                break
            if len(found) >= limit:
                break
    except Exception:
        if not found:
            return None
    return sorted(set(found))


def prepare_pickle(data: bytes, dest: Path, hints: Hints) -> PreparedModel:
    if not data:
        raise InvalidInput("the file is empty", details={"field": "file"})
    _write_model_dir(dest, None, ("sklearn-pickle", data), _signature(hints.n_features, None, hints.feature_names))
    found = pickle_globals(data)
    tags = {
        TAG_TRUSTED: "false",
        TAG_VALIDATION: "pending",
        TAG_VALIDATION_DETAIL: "pickle-based: stored without being loaded; an admin must trust it "
        "(POST .../trust) before the native runtime loads it or POST .../convert makes ONNX",
        TAG_PICKLE_GLOBALS: _short(json.dumps(found)) if found is not None else "unknown (not a plain pickle stream)",
        **_hint_tags(hints),
    }
    return PreparedModel(dest, "sklearn-pickle", ["sklearn-pickle"], tags)


# -- TorchScript -----------------------------------------------------------------------------
def load_torchscript(data: bytes | Path):
    import torch

    try:
        src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
        module = torch.jit.load(src, map_location="cpu")  # TorchScript archive; never torch.load
    except Exception as exc:
        raise InvalidInput(
            f"the file is not a TorchScript archive (save it with torch.jit.save(torch.jit.script(model))): {exc}",
            details={"field": "file"},
        ) from None
    module.eval()
    return module


def torchscript_width(module, hints: Hints) -> int:
    if hints.n_features:
        return hints.n_features
    for p in module.parameters():
        if p.dim() == 2:
            return int(p.shape[1])
    raise InvalidInput(
        "cannot tell the TorchScript model's input width; send n_features with the registration",
        details={"field": "n_features"},
    )


def _torch_run(module, X: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = module(torch.from_numpy(X.astype(np.float32)))
    if not isinstance(out, torch.Tensor):
        raise InvalidInput(
            f"the TorchScript model returns {type(out).__name__}; it must return one tensor "
            "(one score per class, or one value per row)",
            details={"field": "file"},
        )
    return out.numpy()


def torchscript_task(out: np.ndarray, hints: Hints) -> str:
    if hints.task:
        return hints.task
    return "classification" if out.ndim == 2 and out.shape[1] > 1 else "regression"


def prepare_torchscript(data: bytes, dest: Path, settings: Settings, hints: Hints) -> PreparedModel:
    from app.onnx.torch_export import export_torchscript, torchscript_parity

    module = load_torchscript(data)
    width = torchscript_width(module, hints)
    X = _sample_rows(width)
    try:
        reference = _torch_run(module, X)
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(
            f"the TorchScript model fails on {PARITY_ROWS} rows of width {width}: {exc}; send the right n_features",
            details={"field": "n_features"},
        ) from None
    task = torchscript_task(reference, hints)
    is_clf = task == "classification"
    tags: dict[str, str] = {TAG_TASK: task}
    if is_clf:
        tags[TAG_CLASSES] = json.dumps(hints.classes if hints.classes else list(range(reference.shape[1])))
    if hints.feature_names:
        tags[TAG_FEATURES] = json.dumps(hints.feature_names)
    metrics: dict[str, float] = {}
    try:
        model = export_torchscript(module, width, task)
        max_diff, agreement = torchscript_parity(model, X, reference, is_clf)
        model, ptags, metrics = _parity_outcome(model, max_diff, agreement, is_clf, reference, settings)
    except Exception as exc:
        model, ptags = None, {
            TAG_VALIDATION: "failed",
            TAG_CONVERSION_ERROR: _short(f"{type(exc).__name__}: {exc}"),
            TAG_VALIDATION_DETAIL: "no ONNX: the export failed; the native runtime can still serve it",
        }
    tags.update(ptags)
    sample_out = reference[:2] if not is_clf else reference[:2].argmax(axis=1)
    _write_model_dir(dest, model, ("torchscript", data), _signature(width, sample_out, hints.feature_names),
                     {"n_features": width})
    formats = (["onnx"] if model is not None else []) + ["torchscript"]
    return PreparedModel(dest, "torchscript", formats, tags, metrics)


def _hint_tags(hints: Hints) -> dict[str, str]:
    tags = {}
    if hints.task:
        tags[TAG_TASK] = hints.task
    if hints.feature_names:
        tags[TAG_FEATURES] = json.dumps(hints.feature_names)
    if hints.classes:
        tags[TAG_CLASSES] = json.dumps(hints.classes)
    return tags


def prepare(fmt: str, data: bytes, dest: Path, settings: Settings, hints: Hints | None = None) -> PreparedModel:
    """Check a model file in ``fmt`` and write the MLflow model directory ``dest`` (which must
    not exist). Raises ``InvalidInput`` (422) for files that are not what they claim, hold
    untrusted types or cannot be served; pickle-based files are never loaded here."""
    hints = hints or Hints()
    check_format(fmt)
    if fmt == "onnx":
        prepared = prepare_onnx(data, dest, hints)
    elif fmt == "skops":
        prepared = prepare_skops(data, dest, settings, hints)
    elif fmt == "torchscript":
        prepared = prepare_torchscript(data, dest, settings, hints)
    else:
        prepared = prepare_pickle(data, dest, hints)
    prepared.tags[TAG_FORMAT] = prepared.format
    prepared.tags[TAG_FORMATS] = json.dumps(prepared.formats)
    return prepared


# -- MLflow model directories made elsewhere (a run's artifacts) -----------------------------
def inspect_model_dir(model_dir: Path, settings: Settings) -> PreparedModel:
    """Format and tags of an existing MLflow model directory (a run's artifacts, or a directory
    under the artifact root), checked like an upload without changing the directory: an ONNX
    flavor is checked as an ONNX upload; a scikit-learn (or ``matih_native``) flavor is
    ``skops`` (types checked against the allow-list, loaded), ``torchscript`` (loaded) or
    ``sklearn-pickle`` (never loaded, untrusted)."""
    import onnx
    from mlflow.models import Model

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise InvalidInput(
            "the artifact is not an MLflow model (no MLmodel file); log it with mlflow.<flavor>.log_model, "
            "or upload the model file with its format",
            details={"field": "artifact_path"},
        )
    flavors = Model.load(str(mlmodel)).flavors
    formats: list[str] = []
    tags: dict[str, str] = {}
    native_fmt = None
    if NATIVE_FLAVOR in flavors or "sklearn" in flavors:
        native_fmt, path, _conf = native_entry(model_dir)
        data = path.read_bytes()
        if native_fmt in PICKLE_FORMATS:
            tags.update(_pickle_tags(data))
        elif native_fmt == "skops":
            types = skops_types(data, settings)
            _check_estimator(load_skops(data, types))
            tags.update({
                TAG_SKOPS_TYPES: json.dumps(types),
                TAG_VALIDATION: "pending",
                TAG_VALIDATION_DETAIL: "skops: served by the native runtime; POST .../convert makes an ONNX version",
            })
        else:
            load_torchscript(data)
            tags.update({TAG_VALIDATION: "pending", TAG_VALIDATION_DETAIL: "torchscript: served by the native runtime"})
    if "onnx" in flavors:
        path = _flavor_file(model_dir, flavors["onnx"].get("data", "model.onnx"))
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise InvalidInput(f"the model's ONNX file does not parse: {exc}", details={"field": "file"}) from None
        _, onnx_tags = _check_onnx(model, Hints())
        tags.update(onnx_tags)
        formats.append("onnx")
    if native_fmt is not None:
        formats.append(native_fmt)
    if not formats:
        raise InvalidInput(
            f"the MLflow model has flavors {', '.join(sorted(flavors))}; the registry takes onnx and sklearn "
            "models (or upload an onnx, skops, torchscript or sklearn-pickle file)",
            details={"field": "artifact_path"},
        )
    return _finish(PreparedModel(model_dir, native_fmt or "onnx", formats, tags))


def _pickle_tags(data: bytes) -> dict[str, str]:
    found = pickle_globals(data)
    return {
        TAG_TRUSTED: "false",
        TAG_VALIDATION: "pending",
        TAG_VALIDATION_DETAIL: "pickle-based: not loaded; an admin must trust it (POST .../trust) first",
        TAG_PICKLE_GLOBALS: _short(json.dumps(found)) if found is not None else "unknown (not a plain pickle stream)",
    }


def _finish(prepared: PreparedModel) -> PreparedModel:
    prepared.tags[TAG_FORMAT] = prepared.format
    prepared.tags[TAG_FORMATS] = json.dumps(prepared.formats)
    return prepared


def _flavor_file(model_dir: Path, rel: str) -> Path:
    """A file named by an MLmodel flavor: relative, inside the model directory, no symlink out."""
    rel = check_relative_path(rel or "", field="MLmodel path")
    root = os.path.realpath(model_dir)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        raise InvalidInput(f"the MLmodel names {rel!r}, which is not a file inside the model", details={"field": "file"})
    return Path(path)


# -- loading for the native runtime ----------------------------------------------------------
@dataclass
class NativeModel:
    format: str
    model: Any
    n_features: int | None


def native_entry(model_dir: Path) -> tuple[str, Path, dict[str, Any]]:
    """(format, file, flavor config) of a version's native file, from its MLmodel."""
    from mlflow.models import Model

    mlmodel = Path(model_dir) / "MLmodel"
    flavors = Model.load(str(mlmodel)).flavors if mlmodel.is_file() else {}
    if NATIVE_FLAVOR in flavors:
        conf = flavors[NATIVE_FLAVOR]
        return check_format(conf.get("format")), _flavor_file(model_dir, conf.get("path", "")), conf
    if "sklearn" in flavors:
        conf = flavors["sklearn"]
        fmt = "skops" if conf.get("serialization_format") == "skops" else "sklearn-pickle"
        return fmt, _flavor_file(model_dir, conf.get("pickled_model", "")), conf
    raise Conflict(
        "the version has no native model file (it is ONNX only); serve it with runtime 'onnx'",
        code="no_native_artifact",
    )


def load_native(model_dir: Path, metadata: dict[str, Any]) -> NativeModel:
    """Load a version's native file. Pickle-based files load only when the bytes hash to the
    digest an admin trusted (``metadata["trusted_sha256"]``, from the metadata store's trust
    record, never from an MLflow tag); skops files trust only the types the registry
    accepted at registration (tag ``matih.skops_trusted_types``); TorchScript through
    ``torch.jit.load``."""
    from app.registry.trust import file_sha256

    fmt, path, conf = native_entry(model_dir)
    tags = metadata.get("tags") or {}
    model_id = metadata.get("model", "this version")
    if fmt in PICKLE_FORMATS or metadata.get("format") in PICKLE_FORMATS:
        expected = metadata.get("trusted_sha256")
        if not expected:
            raise Conflict(
                f"model {model_id} is pickle-based ({fmt}) and not trusted, so it is never unpickled; an admin "
                "may POST /v1/models/{name}/versions/{v}/trust after reviewing it, or register it as ONNX or skops",
                code="untrusted_model",
                details={"model": model_id, "format": fmt},
            )
        actual = file_sha256(path)
        if actual != expected:
            raise Conflict(
                f"model {model_id} is pickle-based and its file is not the one an admin trusted (sha256 {actual}, "
                f"trusted {expected}), so it is not unpickled; an admin may review it and trust it again",
                code="untrusted_model",
                details={"model": model_id, "format": fmt, "sha256": actual, "trusted_sha256": expected},
            )
        import joblib

        try:
            model = joblib.load(path)  # trusted by an admin: pickle, cloudpickle and joblib files
        except Exception as exc:  # unpickling fails in any way the bytes choose; the file was never loaded before
            raise Conflict(
                f"model {model_id}'s {fmt} file cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                "register a working file as a new version",
                code="unloadable_model",
                details={"model": model_id, "format": fmt},
            ) from None
        return NativeModel(fmt, model, _check_estimator(model))
    if fmt == "skops":
        trusted = json.loads(tags.get(TAG_SKOPS_TYPES, "[]"))
        model = load_skops(path.read_bytes(), trusted)
        return NativeModel(fmt, model, _check_estimator(model))
    module = load_torchscript(path)
    width = conf.get("n_features")
    return NativeModel(fmt, module, int(width) if width else torchscript_width(module, Hints()))
