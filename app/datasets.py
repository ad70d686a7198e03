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


def load_dataset(uri: str, settings=None) -> pd.DataFrame:
    """A DataFrame with feature columns and, for builtin datasets, a ``target`` column.
    ``s3://`` URIs need ``settings`` (the S3 endpoint and keys)."""
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
    if uri.startswith("s3://"):
        return _load_s3(uri, settings)
    if uri.startswith("feast://"):  # a point-in-time set of a Feast feature service (app.features.jobs)
        from app.features.jobs import load_feast_dataset

        return load_feast_dataset(uri, settings)[0]
    path_str = uri[len("file://") :] if uri.startswith("file://") else uri
    if "://" in path_str:
        raise InvalidInput(
            f"dataset {uri!r}: use a builtin:// name, a local .parquet/.csv path or an s3:// URI",
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


def _load_s3(uri: str, settings) -> pd.DataFrame:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from app.storage.s3 import resolve_uri

    if settings is None:
        raise InvalidInput(f"dataset {uri!r}: s3:// needs the platform's S3 settings", details={"field": "dataset.uri"})
    path, fs = resolve_uri(uri, settings)
    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".pq", ".csv"):
        raise InvalidInput(f"dataset {uri!r}: unknown format {suffix or '(none)'}; use .parquet or .csv",
                           details={"field": "dataset.uri"})
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise NotFound(f"dataset {uri} does not exist", details={"field": "dataset.uri"})
    if suffix == ".csv":
        with fs.open_input_stream(path) as f:
            return pcsv.read_csv(f).to_pandas()
    return pq.read_table(path, filesystem=fs).to_pandas()


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
