"""A torch training run's checkpoints: directories of ``model.pt`` (the full model's state
dict, loadable with ``torch.load(weights_only=True)``), ``optimizer.pt`` and ``matih.json``
(epoch, metrics, strategy, history), read, written and listed.

Importable without torch (the API lists a run's checkpoints): torch is imported only where a
checkpoint's tensors are read or written.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from app.errors import InvalidInput

if TYPE_CHECKING:
    from app.settings import Settings

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "matih.json"


def _read_checkpoint(checkpoint) -> dict[str, Any]:
    """{"meta", "model", "optimizer"} of a ray.train.Checkpoint (downloaded when remote)."""
    with checkpoint.as_directory() as path:
        return _read_checkpoint_dir(path, shown_as=checkpoint.path)


def _read_checkpoint_dir(path: str, shown_as: str | None = None) -> dict[str, Any]:
    meta_path, model_path = os.path.join(path, META_FILE), os.path.join(path, MODEL_FILE)
    if not os.path.exists(model_path) or not os.path.exists(meta_path):
        raise InvalidInput(
            f"{shown_as or path} is not a MATIH checkpoint (no {MODEL_FILE} / {META_FILE}); "
            "GET /v1/training/jobs/<id>/checkpoints lists usable ones",
            details={"field": "checkpoint.resume_from"},
        )
    import torch

    with open(meta_path) as f:
        meta = json.load(f)
    opt_path = os.path.join(path, OPTIMIZER_FILE)
    return {
        "meta": meta,
        "model": torch.load(model_path, map_location="cpu", weights_only=True),
        "optimizer": torch.load(opt_path, map_location="cpu", weights_only=True) if os.path.exists(opt_path) else None,
    }


def _write_checkpoint(path: str, model_state: dict, optimizer_state: Any, meta: dict[str, Any]) -> None:
    import torch

    torch.save(model_state, os.path.join(path, MODEL_FILE))
    if optimizer_state is not None:
        torch.save(optimizer_state, os.path.join(path, OPTIMIZER_FILE))
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f)


def _checkpoint_uri(path: str, storage_uri: str) -> str:
    """A checkpoint's path as users give it back (s3:// paths come from pyarrow without the scheme)."""
    return ("s3://" + path.lstrip("/")) if storage_uri.startswith(("s3://", "s3a://")) and "://" not in path else path


def list_checkpoints(storage_dir: str, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Checkpoints of a run that still exist (Ray deletes those beyond keep_best), sorted by
    epoch: {"path", "name", "epoch", "metrics", "created_at"} each, from their matih.json.
    ``storage_dir`` is a local path or an s3:// URI; with ``settings`` the configured S3
    endpoint and keys are used, else pyarrow's defaults (the AWS_* environment)."""
    from pyarrow import fs as pafs

    if settings is not None:
        from app.storage.s3 import resolve_uri

        fs_path, filesystem = resolve_uri(storage_dir, settings)
    elif "://" in storage_dir and not storage_dir.startswith("file://"):
        filesystem, fs_path = pafs.FileSystem.from_uri(storage_dir)
    else:
        filesystem, fs_path = pafs.LocalFileSystem(), os.path.abspath(storage_dir.removeprefix("file://"))
    fs_path = fs_path.rstrip("/")
    out = []
    for info in filesystem.get_file_info(pafs.FileSelector(fs_path, allow_not_found=True)):
        if info.type != pafs.FileType.Directory:
            continue
        try:
            with filesystem.open_input_stream(f"{info.path}/{META_FILE}") as f:
                meta = json.loads(f.read().decode())
        except (FileNotFoundError, OSError, ValueError):
            continue  # not a checkpoint, or one Ray is deleting right now
        out.append({
            "path": _checkpoint_uri(info.path, storage_dir),
            "name": info.base_name,
            "epoch": int(meta.get("epoch", 0)),
            "metrics": meta.get("metrics", {}),
            "created_at": meta.get("created_at"),
        })
    return sorted(out, key=lambda c: (c["epoch"], c["created_at"] or ""))
