"""Scoring an ensemble version's parts on a holdout: the members' ONNX graphs fetched from
the registry, the champion of the ensemble's name (an ensemble or a plain model), whether the
ensemble beats its best member, and the fused graph with its parity check against the fan-out.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from app.ensembles.definition import COMBINER_FILE, DEFINITION_TAG, KIND_TAG, EnsembleDefinition
from app.ensembles.pinning import ENSEMBLE_KIND, client_of, feature_names_of, member_error, model_metadata_of
from app.errors import ModelError
from app.registry.mlflow_registry import TAG_FORMAT, TAG_TASK

log = logging.getLogger(__name__)

#: The metric that decides whether an ensemble beats its best member (and its direction).
MAIN_METRIC = {"classification": ("accuracy", True), "regression": ("rmse", False)}


def download_version(settings, name: str, version: str, dest: Path) -> Path:
    """The version's files into ``dest``. The version's source is asked of the registry first:
    MLflow 3 resolves a ``models:/name/version`` URI with the process's global registry URI
    whatever ``registry_uri`` says, so this works in any process, not only one that set it."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    from app.errors import DependencyUnavailable

    uri = settings.mlflow_tracking_uri
    try:
        source = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(name, version)
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest), tracking_uri=uri)
    except Exception as exc:
        raise DependencyUnavailable(f"could not download {name}/{version} from MLflow: {exc}") from None
    return dest


def load_member_models(client, settings, defn: EnsembleDefinition) -> list[bytes]:
    """Each member's ONNX graph (what local scoring and fusing need): 422 naming a member that
    has none."""
    from app.runtimes.onnx import find_onnx_file

    client = client_of(client)
    out = []
    with tempfile.TemporaryDirectory(prefix="matih-members-") as tmp:
        for i, m in enumerate(defn.members):
            tags = dict(client.get_model_version(m.name, m.version).tags or {})
            if "onnx" not in model_metadata_of(m, tags)["formats"]:
                raise member_error(i, m.ref or m.target, "has no ONNX graph, which scoring the ensemble on the "
                                    "holdout needs; convert it (POST .../convert) or leave dataset out")
            d = download_version(settings, m.name, m.version, Path(tmp) / str(i))
            out.append(find_onnx_file(d).read_bytes())
    return out


# -- scoring --------------------------------------------------------------------------------------
def holdout_labels(data, y: np.ndarray) -> np.ndarray:
    """Original class labels of y (data prepared with encoded labels holds indices)."""
    y = np.asarray(y)
    if data.task == "classification" and data.classes and np.issubdtype(y.dtype, np.integer) \
            and list(data.classes) != list(range(len(data.classes))):
        return np.asarray(data.classes, dtype=object)[y]
    return y


def beats_best_member(task: str, metrics: dict[str, float] | None, member_metrics: list[dict] | None) -> bool | None:
    """Whether the ensemble is strictly better than every member on the task's main metric
    (accuracy, rmse); None when not scored."""
    metric, higher = MAIN_METRIC[task]
    if not metrics or not member_metrics or metric not in metrics:
        return None
    values = [mm.get(metric) for mm in member_metrics if mm and mm.get(metric) is not None]
    if not values:
        return None
    return metrics[metric] > max(values) if higher else metrics[metric] < min(values)


def champion_report(client, settings, defn: EnsembleDefinition, alias: str, data, y_true) -> dict[str, Any] | None:
    """The ``alias`` version of the ensemble's name scored on the same holdout: an ensemble
    through LocalEnsemble, a plain ONNX model directly; None when there is none. One that
    cannot be scored comes back without metrics and a note saying why (its gates then fail)."""
    from mlflow.exceptions import MlflowException

    from app.training.validation import score_onnx

    try:
        mv = client.get_model_version_by_alias(defn.name, alias)
    except MlflowException:
        return None
    tags = dict(mv.tags or {})
    out: dict[str, Any] = {"version": str(mv.version), "alias": alias, "metrics": None}
    features = feature_names_of(tags)
    if features is not None and data.feature_names and features != data.feature_names:
        out["note"] = f"the {alias} was trained on other features ({features}); not comparable"
        return out
    if tags.get(TAG_TASK) and tags[TAG_TASK] != data.task:
        out["note"] = f"the {alias} is a {tags[TAG_TASK]} model; this ensemble is {data.task}"
        return out
    try:
        with tempfile.TemporaryDirectory(prefix="matih-champion-") as tmp:
            d = download_version(settings, defn.name, str(mv.version), Path(tmp) / "c")
            if tags.get(KIND_TAG) == ENSEMBLE_KIND:
                from app.ensembles.local import LocalEnsemble

                cdefn = EnsembleDefinition.from_json(tags[DEFINITION_TAG])
                comb = (d / COMBINER_FILE).read_bytes() if (d / COMBINER_FILE).exists() else None
                local = LocalEnsemble(cdefn, load_member_models(client, settings, cdefn), comb)
                out["metrics"], _ = local.score(data.X_holdout, y_true)
            elif tags.get(TAG_FORMAT, "onnx") == "onnx":
                from app.runtimes.onnx import find_onnx_file

                out["metrics"] = score_onnx(find_onnx_file(d).read_bytes(), data.X_holdout, y_true, data.task,
                                            data.classes)
            else:
                out["note"] = f"the {alias} is a {tags.get(TAG_FORMAT)} model; only ONNX versions are scored here"
    except Exception as exc:  # the champion cannot be scored: the gates that need it fail, saying so
        out["note"] = f"the {alias} could not be scored: {type(exc).__name__}: {getattr(exc, 'message', exc)}"
    return out


def _parity_rows(defn: EnsembleDefinition, data) -> np.ndarray:
    if data is not None:
        return data.X_holdout
    return np.random.default_rng(0).normal(size=(32, defn.n_features or 1)).astype(np.float32)


def fused_graph(defn: EnsembleDefinition, member_models: list[bytes], combiner: bytes | None, local, data,
          settings) -> tuple[Any, float | None, str | None]:
    """(fused ModelProto or None, max |fused - fan-out|, why not fused)."""
    import onnx

    from app.ensembles import fused as F
    from app.training.validation import onnx_outputs

    if not F.fusable(defn):
        return None, None, "not every member and combiner can be fused into one ONNX graph"
    proto = F.fuse(defn, [onnx.load_from_string(b) for b in member_models],
                   onnx.load_from_string(combiner) if combiner is not None else None)
    X = _parity_rows(defn, data)
    scale = 1.0
    if defn.task == "regression":  # relative to the size of the predictions, as training's parity
        scale = max([1.0] + [float(np.max(np.abs(onnx_outputs(b, X)[0]))) for b in member_models])
    tolerance = settings.jobs.onnx_parity_tolerance * scale
    try:
        diff = float(F.check_parity(proto.SerializeToString(), local, X, tolerance=tolerance))
    except ModelError as exc:  # the fan-out stays the ensemble; the version is still made
        return None, None, f"the fused graph was not stored: {exc.message}"
    if not diff <= tolerance:
        return None, diff, f"the fused graph differs from the fan-out by {diff:.3g} (> {tolerance:.3g}); not stored"
    return proto, diff, None
