"""Prediction payloads -> a float32 feature matrix, with errors that name the bad field.

Accepted forms (as in KServe V1 / MLflow scoring):

* ``{"instances": [[5.1, 3.5, 1.4, 0.2], ...]}`` rows in model feature order;
* ``{"instances": [{"sepal_length": 5.1, ...}, ...]}`` rows keyed by feature name;
* ``{"inputs": {"sepal_length": [5.1, ...], ...}}`` columns;
* ``{"tensor": [[5.1, 3.5, 1.4, 0.2], ...]}`` a 2-D matrix (list or numpy array) in model
  feature order: what the Open Inference Protocol routes send (``app/serving/v2_codec.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from app.errors import InvalidInput
from app.serving.signature import ModelSignature


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(
            f"{where} is {value!r} ({type(value).__name__}); every feature must be a number",
            details={"field": where},
        )
    if not math.isfinite(value):
        raise InvalidInput(f"{where} is {value!r}; features must be finite numbers", details={"field": where})
    return float(value)


def _check_width(width: int, signature: ModelSignature, where: str) -> None:
    if signature.n_features is not None and width != signature.n_features:
        names = f" ({', '.join(signature.feature_names)})" if signature.feature_names else ""
        raise InvalidInput(
            f"{where} has {width} features; the model takes {signature.n_features}{names}",
            details={"field": where, "expected": signature.n_features, "got": width},
        )


def _rows_from_dicts(rows: list[dict], signature: ModelSignature) -> list[list[float]]:
    names = signature.feature_names
    if not names:
        raise InvalidInput(
            "this model has no recorded feature names; send instances as lists in model order",
            details={"field": "instances"},
        )
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInput(f"instances[{i}] must be an object like instances[0]", details={"field": f"instances[{i}]"})
        missing = [n for n in names if n not in row]
        extra = [k for k in row if k not in names]
        if missing or extra:
            raise InvalidInput(
                f"instances[{i}]: missing features {missing}, unknown features {extra}; expected {names}",
                details={"field": f"instances[{i}]"},
            )
        out.append([_number(row[n], f"instances[{i}].{n}") for n in names])
    return out


def _tensor_matrix(tensor: Any, signature: ModelSignature, max_rows: int) -> np.ndarray:
    try:
        matrix = np.asarray(tensor)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"'tensor' must be a 2-D matrix of numbers: {exc}", details={"field": "tensor"}) from None
    if matrix.dtype.kind not in "iuf":
        raise InvalidInput(
            f"'tensor' holds {matrix.dtype} values; it must be a 2-D matrix of numbers", details={"field": "tensor"}
        )
    matrix = matrix.astype(np.float32, copy=False)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise InvalidInput(
            f"'tensor' has shape {list(matrix.shape)}; it must be [rows, n_features] with at least one row",
            details={"field": "tensor"},
        )
    if matrix.shape[0] > max_rows:
        raise InvalidInput(f"'tensor' has {matrix.shape[0]} rows; at most {max_rows} per request")
    _check_width(matrix.shape[1], signature, "tensor")
    if not np.isfinite(matrix).all():
        raise InvalidInput("'tensor' holds NaN or infinite values; features must be finite numbers", details={"field": "tensor"})
    return np.ascontiguousarray(matrix)


def payload_to_matrix(payload: dict[str, Any], signature: ModelSignature, max_rows: int = 100_000) -> np.ndarray:
    instances = payload.get("instances")
    inputs = payload.get("inputs")
    tensor = payload.get("tensor")
    if tensor is not None:
        if instances is not None or inputs is not None:
            raise InvalidInput("send exactly one of 'instances', 'inputs' or 'tensor'", details={"field": "tensor"})
        return _tensor_matrix(tensor, signature, max_rows)
    if (instances is None) == (inputs is None):
        raise InvalidInput(
            "send exactly one of 'instances' (rows) or 'inputs' (columns)", details={"field": "instances"}
        )
    if instances is not None:
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list of rows", details={"field": "instances"})
        if len(instances) > max_rows:
            raise InvalidInput(f"'instances' has {len(instances)} rows; at most {max_rows} per request")
        if isinstance(instances[0], dict):
            rows = _rows_from_dicts(instances, signature)
        else:
            rows = []
            for i, row in enumerate(instances):
                if not isinstance(row, list):
                    raise InvalidInput(
                        f"instances[{i}] must be a list of feature values (or an object keyed by feature name)",
                        details={"field": f"instances[{i}]"},
                    )
                _check_width(len(row), signature, f"instances[{i}]")
                rows.append([_number(v, f"instances[{i}][{j}]") for j, v in enumerate(row)])
        if signature.n_features is None:
            widths = {len(r) for r in rows}
            if len(widths) != 1:
                raise InvalidInput("every row in 'instances' must have the same number of features")
        return np.asarray(rows, dtype=np.float32)

    if not isinstance(inputs, dict) or not inputs:
        raise InvalidInput("'inputs' must map feature names to lists of values", details={"field": "inputs"})
    names = signature.feature_names or list(inputs)
    missing = [n for n in names if n not in inputs]
    extra = [k for k in inputs if k not in names]
    if missing or extra:
        raise InvalidInput(
            f"inputs: missing features {missing}, unknown features {extra}; expected {names}",
            details={"field": "inputs"},
        )
    _check_width(len(names), signature, "inputs")
    lengths = {len(inputs[n]) if isinstance(inputs[n], list) else -1 for n in names}
    if -1 in lengths or len(lengths) != 1 or 0 in lengths:
        raise InvalidInput("every column in 'inputs' must be a non-empty list, all of one length", details={"field": "inputs"})
    n_rows = lengths.pop()
    if n_rows > max_rows:
        raise InvalidInput(f"'inputs' has {n_rows} rows; at most {max_rows} per request")
    cols = [[_number(v, f"inputs.{n}[{i}]") for i, v in enumerate(inputs[n])] for n in names]
    return np.asarray(cols, dtype=np.float32).T.copy()


def prepare(payload: dict[str, Any], signature: ModelSignature, max_rows: int) -> tuple[np.ndarray, bool]:
    """A prediction payload checked against ``signature``: (float32 matrix, want probabilities).
    What a server does before it hands the matrix to a runtime's ``predict``."""
    return payload_to_matrix(payload, signature, max_rows=max_rows), bool(payload.get("return_probabilities"))
