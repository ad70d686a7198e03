"""Datasets for training jobs: ``builtin://`` names shipped with scikit-learn, local parquet
and CSV files. Nothing is downloaded at run time."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from app.errors import InvalidInput, NotFound

# Only loaders whose data ship inside scikit-learn (no fetch_* functions: those download).
_BUILTIN = {
    "iris": "load_iris",
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
    "diabetes": "load_diabetes",
    "digits": "load_digits",
}


def builtin_names() -> list[str]:
    return sorted(_BUILTIN)


def load_dataset(uri: str) -> pd.DataFrame:
    """A DataFrame with feature columns and, for builtin datasets, a ``target`` column."""
    if uri.startswith("builtin://"):
        name = uri[len("builtin://") :]
        if name not in _BUILTIN:
            raise InvalidInput(
                f"dataset {uri!r} is not built in; use one of "
                + ", ".join(f"builtin://{n}" for n in builtin_names()),
                details={"field": "dataset.uri"},
            )
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, _BUILTIN[name])(as_frame=True)
        frame = bunch.frame.copy()
        frame.columns = [str(c).replace(" (cm)", "").replace(" ", "_") for c in frame.columns]
        return frame
    path_str = uri[len("file://") :] if uri.startswith("file://") else uri
    if "://" in path_str:
        raise InvalidInput(
            f"dataset {uri!r}: only builtin:// names and local .parquet/.csv paths are supported here",
            details={"field": "dataset.uri"},
        )
    path = Path(path_str)
    if not path.exists():
        raise NotFound(f"dataset file {path} does not exist", details={"field": "dataset.uri"})
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix == ".csv":
        return pd.read_csv(path)
    raise InvalidInput(
        f"dataset {uri!r}: unknown format {suffix or '(none)'}; use .parquet or .csv", details={"field": "dataset.uri"}
    )


def split_features(frame: pd.DataFrame, target: str, features: list[str] | None) -> tuple[pd.DataFrame, pd.Series]:
    if target not in frame.columns:
        raise InvalidInput(
            f"target column {target!r} is not in the dataset; columns are: {', '.join(map(str, frame.columns))}",
            details={"field": "dataset.target"},
        )
    cols = features or [c for c in frame.columns if c != target]
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise InvalidInput(f"feature columns {missing} are not in the dataset", details={"field": "dataset.features"})
    X = frame[cols]
    non_numeric = [c for c in cols if not pd.api.types.is_numeric_dtype(X[c])]
    if non_numeric:
        raise InvalidInput(
            f"feature columns {non_numeric} are not numeric; encode them before training",
            details={"field": "dataset.features"},
        )
    return X.astype("float32"), frame[target]
