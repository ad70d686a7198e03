"""ONNX conversion, parity checks and compaction, shared by training and the registry.

- ``app/onnx/sklearn_export.py``: scikit-learn estimators to ONNX (skl2onnx), and parity
  with the estimator;
- ``app/onnx/torch_export.py``: the torch zoo's trained models and uploaded TorchScript
  modules to ONNX (``torch.onnx.export``), and parity with torch;
- ``app/onnx/compact.py``: tree-ensemble classifiers compacted after skl2onnx.

This package imports neither ``app.training`` nor ``app.registry``: both import it.
Heavy libraries (skl2onnx, torch, onnxruntime) are imported where they are used, except in
``torch_export``, which needs torch at import time and is imported lazily by its callers.
"""
