"""The data of a training job, loaded and split once: the same arrays feed scikit-learn, the
torch workers, every Tune trial and the validation gates."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from app.datasets import load_dataset, split_features
from app.errors import InvalidInput
from app.registry.lineage import frame_sha256

#: A target with at most this many distinct integer (or any string) values is a class label.
MAX_CLASSES = 100


@dataclass
class PreparedData:
    """Train and holdout arrays (features float32), with what the model and the registry need."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_holdout: np.ndarray
    y_holdout: np.ndarray
    feature_names: list[str]
    task: str  # "classification" or "regression"
    classes: list = field(default_factory=list)  # original labels; y_* hold their indices 0..k-1 for torch
    dataset_uri: str = ""
    dataset_sha256: str = ""
    # A feast:// dataset's feature service: {name, project, version, features, view_versions}
    feature_service: dict | None = None

    @property
    def n_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def n_outputs(self) -> int:
        """Logits per row for classification, 1 for regression."""
        return len(self.classes) if self.task == "classification" else 1


def infer_task(y: pd.Series, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return "classification"
    if pd.api.types.is_integer_dtype(y) or np.all(np.mod(y.to_numpy(dtype=float), 1) == 0):
        return "classification" if y.nunique() <= MAX_CLASSES else "regression"
    return "regression"


def prepare_data(uri: str, target: str, features: list[str] | None, test_size: float, seed: int,
                 task: str = "auto", encode_labels: bool = False, settings=None) -> PreparedData:
    """Load, split (stratified for classification when every class has two rows) and, with
    ``encode_labels``, turn class labels into indices 0..k-1 (what a torch loss needs)."""
    from sklearn.model_selection import train_test_split

    service = None
    if uri.startswith("feast://"):
        from app.features.jobs import load_feast_dataset

        frame, service = load_feast_dataset(uri, settings, keep=[*(features or []), target])
    else:
        frame = load_dataset(uri, settings)
    X, y = split_features(frame, target, features)
    task = infer_task(y, task)
    if task == "regression" and not pd.api.types.is_numeric_dtype(y):
        raise InvalidInput(f"target {target!r} is not numeric; a regression needs numbers", details={"field": "task"})
    stratify = y if task == "classification" and y.nunique() > 1 and y.value_counts().min() >= 2 else None
    X_train, X_hold, y_train, y_hold = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=stratify
    )
    classes: list = []
    ytr, yho = y_train.to_numpy(), y_hold.to_numpy()
    if task == "classification":
        classes = sorted(pd.unique(y).tolist())
        if len(classes) < 2:
            raise InvalidInput(f"target {target!r} has one class only; nothing to learn", details={"field": "dataset.target"})
        if encode_labels:
            index = {c: i for i, c in enumerate(classes)}
            ytr = np.array([index[v] for v in ytr], dtype=np.int64)
            yho = np.array([index[v] for v in yho], dtype=np.int64)
    else:
        ytr, yho = ytr.astype(np.float32), yho.astype(np.float32)
    classes = [c.item() if hasattr(c, "item") else c for c in classes]
    return PreparedData(
        X_train=X_train.to_numpy(dtype=np.float32), y_train=ytr,
        X_holdout=X_hold.to_numpy(dtype=np.float32), y_holdout=yho,
        feature_names=[str(c) for c in X.columns], task=task, classes=classes,
        dataset_uri=uri, dataset_sha256=frame_sha256(frame), feature_service=service,
    )
