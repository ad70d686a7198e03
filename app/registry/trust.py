"""Which bytes of a model version an admin vouched for.

Trust (for pickle-based files) and approval (for production) are records in the metadata
store, each with the sha256 of the version's model file; MLflow tags such as
``matih.trusted`` only mirror them for people reading MLflow, and anyone with write access
to MLflow can set those. A pickle-based file is unpickled only when its bytes hash to the
digest of its trust record (:func:`app.registry.formats.load_native`), so neither a forged
tag nor an artifact replaced after the admin looked at it makes the platform load anything.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_file(model_dir: Path) -> Path:
    """The file of a version's MLflow model directory that trust and approval are about: its
    native file (pickle, skops, TorchScript) when it has one, else its ONNX file."""
    from app.errors import Conflict, ModelError
    from app.registry.formats import native_entry

    try:
        return native_entry(model_dir)[1]
    except Conflict:  # ONNX only
        found = sorted(Path(model_dir).rglob("*.onnx"))
        if not found:
            raise ModelError(f"no model file in the version's artifacts at {model_dir}") from None
        return found[0]


def model_sha256(model_dir: Path) -> str:
    """sha256 of :func:`model_file`."""
    return file_sha256(model_file(model_dir))
