"""What runs inside a batch job's predictor actors: :class:`OnnxBatchPredictor` over pyarrow
tables.

Kept apart from :mod:`app.batch.predict` on purpose: Ray Data unpickles these classes in every
fresh actor process by importing this module, so it imports nothing beyond NumPy and the
error types at module level (no settings, registry or pydantic models). Each import saved
here is saved once per predictor actor, per job.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.errors import InvalidInput, ModelError


class OnnxBatchPredictor:
    """One ONNX Runtime session; called with pyarrow tables, returns the output table
    (kept columns, ``prediction``, optional probabilities) with the same rows in the same order.

    Ray Data constructs one per actor of the pool (``map_batches(OnnxBatchPredictor, ...)``)
    and calls it with whole blocks; the predictor runs ONNX Runtime on ``batch_size`` rows at a
    time (all of them when None). Batching here rather than in Ray Data lets Ray Data fuse the
    read into the predictor actors. ``onnx_model`` is the model's bytes, or a Ray ``ObjectRef``
    to them: the job puts the model in the object store once and every actor maps it from there.
    """

    def __init__(
        self,
        onnx_model: Any,
        feature_columns: list[str],
        keep_columns: list[str] | None = None,
        *,
        probabilities: bool = False,
        classes: list[Any] | None = None,
        wide_probabilities: bool = False,
        intra_op_threads: int = 1,
        batch_size: int | None = None,
    ):
        import onnxruntime as ort

        from app.runtimes.onnx import available_providers, session_options

        if not isinstance(onnx_model, (bytes, bytearray, memoryview)):
            import ray

            onnx_model = ray.get(onnx_model)
        try:
            self.session = ort.InferenceSession(
                onnx_model, sess_options=session_options(intra_op_threads), providers=available_providers()
            )
        except Exception as exc:
            raise ModelError(f"ONNX Runtime could not load the model: {exc}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        width = inp.shape[1] if len(inp.shape) == 2 and isinstance(inp.shape[1], int) else None
        if width is not None and width != len(feature_columns):
            raise InvalidInput(
                f"the model takes {width} features but {len(feature_columns)} feature columns were given: "
                f"{feature_columns}",
                details={"field": "feature_columns"},
            )
        outputs = [o.name for o in self.session.get_outputs()]
        self.label_out = next((o for o in outputs if o.lower().startswith("label")), outputs[0])
        self.proba_out = next((o for o in outputs if "prob" in o.lower()), None)
        self.feature_columns = list(feature_columns)
        self.keep_columns = list(keep_columns or [])
        self.probabilities = bool(probabilities and self.proba_out)
        self.classes = classes
        self.wide_probabilities = wide_probabilities
        self.batch_size = batch_size

    def features(self, batch) -> np.ndarray:
        """The batch's feature columns as a C-ordered float32 matrix; nulls are refused."""
        out = np.empty((batch.num_rows, len(self.feature_columns)), dtype=np.float32)
        for j, name in enumerate(self.feature_columns):
            col = batch.column(name)
            if col.null_count:
                raise InvalidInput(
                    f"feature column {name!r} has {col.null_count} empty values in a batch; fill them first"
                )
            out[:, j] = col.to_numpy()
        return out

    def predict(self, batch):
        """The model outputs for a table: (labels, probabilities or None)."""
        wanted = [self.label_out] + ([self.proba_out] if self.probabilities else [])
        try:
            outs = self.session.run(wanted, {self.input_name: self.features(batch)})
        except InvalidInput:
            raise
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed on a batch of {batch.num_rows} rows: {exc}") from None
        return outs[0], (outs[1] if self.probabilities else None)

    def __call__(self, batch):
        import pyarrow as pa

        step = self.batch_size or batch.num_rows
        if batch.num_rows <= step:
            pred, proba = self.predict(batch)
        else:
            parts = [self.predict(batch.slice(i, step)) for i in range(0, batch.num_rows, step)]
            pred = np.concatenate([np.asarray(p) for p, _ in parts])
            proba = np.concatenate([q for _, q in parts]) if self.probabilities else None
        pred = np.asarray(pred)
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        columns = {name: batch.column(name) for name in self.keep_columns}
        columns["prediction"] = pa.array(pred)
        if proba is not None:
            proba = np.ascontiguousarray(proba, dtype=np.float32)
            if self.wide_probabilities:  # CSV has no list type: one column per class
                names = self.classes if self.classes and len(self.classes) == proba.shape[1] else range(proba.shape[1])
                for j, cls in enumerate(names):
                    columns[f"probability_{cls}"] = pa.array(proba[:, j])
            else:
                columns["probabilities"] = pa.FixedSizeListArray.from_arrays(
                    pa.array(proba.reshape(-1)), proba.shape[1]
                )
        return pa.table(columns)
