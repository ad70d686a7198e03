"""Torch training of the built-in zoo: one loop, four strategies, on Ray Train (V2).

``fit_torch`` runs a ``ray.train.torch.TorchTrainer`` whose workers all run
:func:`_train_loop_per_worker`:

- ``single``: one worker, the plain model;
- ``data_parallel``: DDP (``ray.train.torch.prepare_model``), each rank on its shard of rows;
- ``model_parallel``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on a device mesh of all
  ranks, so each rank holds only its shard of every layer's parameters; rows are sharded too;
- ``pipeline_parallel``: the mlp cut into one stage per rank (``torch.distributed.pipelining``),
  batches split into ``microbatches`` and run through a GPipe schedule; the loss is on the
  last stage.

Ray Train picks the process-group backend (gloo on CPU, NCCL on GPU) and the device
(``ray.train.torch.get_device``), so the same loop runs on a laptop and on a GPU cluster.

Every epoch rank 0 scores the whole model on the holdout (FSDP and pipeline ranks first send
it their parts), every ``checkpoint.frequency`` epochs (and after the last) it saves a
checkpoint directory: ``model.pt`` (the full model's state dict, loadable with
``torch.load(weights_only=True)``), ``optimizer.pt`` and ``matih.json``. Ray Train keeps the
best ``keep_best`` of them (plus the latest) and, after a worker dies, restarts the workers,
which continue from the latest checkpoint. Rank 0 writes the job's progress to the metadata
store after each epoch.

Where a run starts: ``checkpoint.resume_from`` seeds it; after a worker failure Ray Train
restarts every worker and the latest checkpoint of this run (``ray.train.get_checkpoint()``)
wins. Runs live in ``<storage>/<job id>``, so a job retried after a crash continues from its
own latest checkpoint. ``restarts`` in the job's progress counts how often the loop started
again within one ``fit_torch`` call.

``train_in_process`` is the same loop without Ray Train, for Ray Tune trials.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from app.errors import InvalidInput, MatihError, ModelError
from app.training.data import PreparedData
from app.training.spec import TorchHyperparameters, TrainingJobSpec
from app.training.torch_models import (
    build_model,
    merge_stage_state_dicts,
    pipeline_stages,
)
from app.training.validation import classification_metrics, regression_metrics

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
META_FILE = "matih.json"
CLASSIFICATION_EPOCH_METRICS: tuple[str, ...] = ("val_loss", "train_loss", "accuracy", "f1", "log_loss")
REGRESSION_EPOCH_METRICS: tuple[str, ...] = ("val_loss", "train_loss", "rmse", "mae", "r2")


@dataclass
class TorchResult:
    """What a torch training run hands to the trainer: the model to validate and register
    (on CPU, in eval mode, with the best checkpoint's weights) and where the run's
    checkpoints are."""

    model: nn.Module
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    best_checkpoint: str | None = None
    storage_dir: str = ""


# -- shared by every strategy and by train_in_process ---------------------------------------


def torch_hparams(spec: TrainingJobSpec, hparams: dict[str, Any] | None = None) -> TorchHyperparameters:
    """The spec's hyperparameters with ``hparams`` (a Tune trial's sample) on top."""
    merged = {**spec.hyperparameters, **(hparams or {})}
    try:
        return TorchHyperparameters.model_validate(merged)
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"torch hyperparameters {merged} are invalid: {bad}",
                           details={"field": "hyperparameters"}) from None


def epoch_metric_names(task: str) -> tuple[str, ...]:
    """Metrics reported each epoch (what checkpoint.metric may name)."""
    return CLASSIFICATION_EPOCH_METRICS if task == "classification" else REGRESSION_EPOCH_METRICS


def _check_inputs(spec: TrainingJobSpec, data: PreparedData) -> None:
    if spec.framework != "torch" or spec.model is None:
        raise InvalidInput(f"job {spec.name!r} is framework {spec.framework!r}; torch training needs framework 'torch'")
    if data.task == "classification":
        y = np.concatenate([np.asarray(data.y_train), np.asarray(data.y_holdout)])
        if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 or y.max(initial=0) >= len(data.classes):
            raise InvalidInput(
                f"classification targets must be class indices 0..{len(data.classes) - 1} (got dtype {y.dtype}); "
                "prepare the data with encode_labels=True"
            )
    if len(data.X_train) == 0 or len(data.X_holdout) == 0:
        raise InvalidInput(
            f"dataset {data.dataset_uri!r} leaves {len(data.X_train)} training and {len(data.X_holdout)} holdout rows; "
            "torch training needs both"
        )


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _optimizer(params, hp: TorchHyperparameters) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)


def _loss_fn(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "classification":
        return F.cross_entropy

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.reshape(-1), y)

    return mse


def _tensors(X: np.ndarray, y: np.ndarray, task: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies: arrays from ray.get are read-only views of the object store.
    Xt = torch.tensor(np.asarray(X, dtype=np.float32), device=device)
    yt = torch.tensor(np.asarray(y, dtype=np.int64 if task == "classification" else np.float32), device=device)
    return Xt, yt


def _batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
             whole: bool = False) -> list[torch.Tensor]:
    """Row indices of one epoch's batches. The shuffle depends on (seed, epoch) only, so every
    rank, and a run resumed from a checkpoint, sees the same order. With ``world`` > 1 the rows
    are padded (by repeating) to a multiple of ``world`` and rank ``rank`` takes every
    ``world``-th, so all ranks run the same number of steps (as DistributedSampler does).
    ``whole`` pads to full batches: a pipeline schedule needs one batch shape throughout."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    if world > 1:
        total = -(-n // world) * world
        perm = perm[torch.arange(total) % n][rank::world]
    if whole:
        m = len(perm)
        perm = perm[torch.arange(-(-m // batch_size) * batch_size) % m]
    return list(perm.split(batch_size))


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor,
                 loss_fn, batches: list[torch.Tensor]) -> tuple[float, int]:
    """One epoch of plain steps; (sum of batch losses x rows, rows)."""
    model.train()
    total, rows = 0.0, 0
    for idx in batches:
        idx = idx.to(X.device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        rows += len(idx)
    return total, rows


def evaluate_model(model: nn.Module, data: PreparedData, device: torch.device | str | None = None,
                   full: bool = True) -> dict[str, float]:
    """Holdout metrics of a (plain, unwrapped) model; leaves it in eval mode.

    ``full``: val_loss plus what validation gates read (accuracy, f1, log_loss, roc_auc, or
    rmse, mae, r2), through scikit-learn. Otherwise the per-epoch set computed with numpy
    alone (val_loss, accuracy, f1, log_loss, or val_loss, rmse, mae, r2): Ray Train workers
    then never import scikit-learn, which costs seconds per worker start."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    X, y = _tensors(data.X_holdout, data.y_holdout, data.task, device)
    model.eval()
    with torch.no_grad():
        out = model(X)
        val_loss = float(_loss_fn(data.task)(out, y))
    y_true = np.asarray(data.y_holdout)
    if data.task == "classification":
        proba = torch.softmax(out.double(), dim=1).cpu().numpy()
        labels = proba.argmax(axis=1)
        if full:
            return {"val_loss": val_loss,
                    **classification_metrics(y_true, labels, proba, classes=list(range(len(data.classes))))}
        return {"val_loss": val_loss, "accuracy": float(np.mean(labels == y_true)),
                "f1": _f1(y_true, labels, len(data.classes)), "log_loss": val_loss}
    pred = out.reshape(-1).double().cpu().numpy()
    if full:
        return {"val_loss": val_loss, **regression_metrics(y_true, pred)}
    err = pred - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    return {"val_loss": val_loss, "rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
            "r2": 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else 0.0}


def _f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """F1 as app.training.validation reports it: of the last class for two classes, else the
    macro average over the classes present in either array (scikit-learn's defaults)."""
    def f1_of(c: int) -> float:
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0

    if n_classes == 2:
        return f1_of(1)
    present = np.union1d(y_true, y_pred)
    return float(np.mean([f1_of(int(c)) for c in present]))


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _describe(metrics: dict[str, float]) -> str:
    keys = [k for k in ("train_loss", "val_loss", "accuracy", "rmse") if k in metrics]
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys)


def train_in_process(spec: TrainingJobSpec, data: PreparedData, hparams: dict[str, Any],
                     on_epoch: Callable[[int, dict[str, float]], None]) -> tuple[nn.Module, dict[str, float]]:
    """The training loop of strategy ``single`` in this process, without Ray Train: what a Ray
    Tune trial runs. ``on_epoch(epoch, metrics)`` gets the holdout metrics after every epoch
    (the trial reports them to Tune there; raising stops the trial). Returns the final model
    (on CPU, eval mode) and its holdout metrics."""
    _check_inputs(spec, data)
    hp = torch_hparams(spec, hparams)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _seed(hp.seed)
    model = build_model(spec.model, data.n_features, data.n_outputs).to(device)
    opt = _optimizer(model.parameters(), hp)
    loss_fn = _loss_fn(data.task)
    X, y = _tensors(data.X_train, data.y_train, data.task, device)
    metrics: dict[str, float] = {}
    for epoch in range(1, hp.epochs + 1):
        total, rows = _train_steps(model, opt, X, y, loss_fn, _batches(len(X), hp.batch_size, hp.seed, epoch))
        metrics = {"epoch": epoch, "train_loss": total / max(rows, 1), **evaluate_model(model, data, device)}
        on_epoch(epoch, metrics)
        if hp.epoch_sleep_s:
            time.sleep(hp.epoch_sleep_s)
    return model.cpu().eval(), metrics


# -- checkpoints ----------------------------------------------------------------------------


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
    with open(meta_path) as f:
        meta = json.load(f)
    opt_path = os.path.join(path, OPTIMIZER_FILE)
    return {
        "meta": meta,
        "model": torch.load(model_path, map_location="cpu", weights_only=True),
        "optimizer": torch.load(opt_path, map_location="cpu", weights_only=True) if os.path.exists(opt_path) else None,
    }


def _write_checkpoint(path: str, model_state: dict, optimizer_state: Any, meta: dict[str, Any]) -> None:
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


# -- the Ray Train worker loop --------------------------------------------------------------


class _Progress:
    """Rank 0's line to the job row. A store hiccup is logged, never fatal: losing a progress
    line is better than losing the training."""

    def __init__(self, database_url: str, job_id: str):
        from app.store import MetadataStore

        self.job_id = job_id
        self.store = MetadataStore(database_url) if database_url and job_id else None

    def read(self) -> dict[str, Any]:
        if self.store is None:
            return {}
        try:
            return self.store.get_job(self.job_id).get("progress") or {}
        except MatihError as exc:
            log.warning("cannot read the progress of job %s: %s", self.job_id, exc)
            return {}

    def write(self, progress: dict[str, Any], line: str | None = None) -> None:
        if self.store is None:
            return
        try:
            self.store.update_job_progress(self.job_id, progress, line)
        except MatihError as exc:
            log.warning("cannot record the progress of job %s: %s", self.job_id, exc)


def _pick_start(config: dict[str, Any]) -> tuple[Any, dict[str, Any] | None, str]:
    """(checkpoint, its contents, why) this loop starts from. After a worker failure Ray hands
    back the latest checkpoint of this run, which wins over ``resume_from``; a checkpoint left
    by an earlier fit of the same job (same run directory) is used only when no
    ``resume_from`` is asked for (the job crashed and is being retried)."""
    import ray.train

    latest = ray.train.get_checkpoint()
    resume = config["resume_from"]
    if latest is not None:
        state = _read_checkpoint(latest)
        if resume is None or state["meta"].get("attempt") == config["attempt"]:
            return latest, state, "latest"
    if resume is not None:
        return resume, _read_checkpoint(resume), "resume_from"
    return None, None, "scratch"


class _Parallel:
    """One rank's share of the model under a strategy: what it trains, how an epoch runs, and
    how the whole model's weights and the optimizer state reach rank 0. Built from the full
    model (every rank builds it with the same seed) and the optimizer state of a checkpoint
    written by the same strategy and world size, or None."""

    shards_rows = True  # each rank trains on its own share of the rows

    def __init__(self, model: nn.Module, hp: TorchHyperparameters, task: str, optimizer_state: Any,
                 rank: int, world: int, device: torch.device):
        self.full_model, self.hp, self.rank, self.world, self.device = model, hp, rank, world, device
        self.loss_fn = _loss_fn(task)
        self.distributed = world > 1
        self.module = self._wrap(model)
        self.opt = _optimizer(self.module.parameters(), hp)
        if optimizer_state is not None:
            self._load_optimizer(optimizer_state)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def _load_optimizer(self, state: Any) -> None:
        self.opt.load_state_dict(state)

    def batch_size(self, n_rows: int) -> int:
        return min(self.hp.batch_size, n_rows)

    def train_epoch(self, X: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, int]:
        rank, world = (self.rank, self.world) if self.shards_rows else (0, 1)
        batches = _batches(len(X), self.batch_size(len(X)), self.hp.seed, epoch, rank, world)
        return _train_steps(self.module, self.opt, X, y, self.loss_fn, batches)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on CPU at rank 0 (None elsewhere); collective."""
        return _cpu_state(getattr(self.module, "module", self.module).state_dict()) if self.rank == 0 else None

    def optimizer_state(self) -> Any:
        """What optimizer.pt holds, at rank 0 (None elsewhere); collective."""
        return self.opt.state_dict() if self.rank == 0 else None

    def local_params(self) -> int:
        """Parameters this rank really holds (its shards under FSDP, its stage in a pipeline)."""
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.module.parameters())


class _DataParallel(_Parallel):
    """DDP through Ray Train (which also moves the model to the worker's device)."""

    def _wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)


class _ModelParallel(_Parallel):
    """FSDP2: every Linear / Conv2d / transformer layer is its own unit, gathered only around
    its own forward and backward; the root holds the rest (embeddings, norms). Each rank keeps
    1/world of every parameter."""

    def _wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if not self.distributed:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        units = (nn.Linear, nn.Conv2d, nn.TransformerEncoderLayer)

        def walk(module: nn.Module) -> None:
            for child in module.children():
                if isinstance(child, units):
                    fully_shard(child, mesh=mesh)
                else:
                    walk(child)

        walk(model)
        fully_shard(model, mesh=mesh)
        return model

    @staticmethod
    def _options(cpu_offload: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)

    def _load_optimizer(self, state: Any) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if self.distributed:  # the full, name-keyed state; every rank takes its shards
            set_optimizer_state_dict(self.module, self.opt, state, options=self._options(cpu_offload=False))
        else:
            self.opt.load_state_dict(state)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        if not self.distributed:
            return super().full_state()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.module, options=self._options())
        return state if self.rank == 0 else None

    def optimizer_state(self) -> Any:
        if not self.distributed:
            return super().optimizer_state()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.module, self.opt, options=self._options())
        return state if self.rank == 0 else None


class _PipelineParallel(_Parallel):
    """Rank r trains stage r of the mlp (``pipeline_stages``); every rank walks the same
    batches, rank 0 feeds the rows, the last rank the targets and the loss. The optimizer
    state is a list by stage."""

    shards_rows = False

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        stage = pipeline_stages(model, self.world)[self.rank].to(self.device)
        self.schedule = ScheduleGPipe(PipelineStage(stage, self.rank, self.world, self.device),
                                      n_microbatches=self.hp.microbatches, loss_fn=self.loss_fn)
        return stage

    def _load_optimizer(self, state: Any) -> None:
        self.opt.load_state_dict(state[self.rank])

    def batch_size(self, n_rows: int) -> int:
        # The schedule splits each batch into microbatches; it needs equal ones.
        size = min(self.hp.batch_size, n_rows)
        return size - size % self.hp.microbatches

    def train_epoch(self, X: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[float, int]:
        self.module.train()
        first, last = self.rank == 0, self.rank == self.world - 1
        total, rows = 0.0, 0
        # whole=True: the schedule fixes its buffers' shapes on the first step.
        for idx in _batches(len(X), self.batch_size(len(X)), self.hp.seed, epoch, whole=True):
            idx = idx.to(self.device)
            self.opt.zero_grad(set_to_none=True)
            losses: list[torch.Tensor] = []
            args = (X[idx],) if first else ()
            kwargs = {"target": y[idx], "losses": losses} if last else {}
            self.schedule.step(*args, **kwargs)
            self.opt.step()
            if losses:
                total += float(torch.stack([loss.detach() for loss in losses]).mean()) * len(idx)
                rows += len(idx)
        return total, rows

    def _gather(self, value: Any) -> list[Any] | None:
        import torch.distributed as dist

        if not self.distributed:
            return [value]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, value)
        return parts if self.rank == 0 else None

    def full_state(self) -> dict[str, torch.Tensor] | None:
        parts = self._gather(_cpu_state(self.module.state_dict()))
        return merge_stage_state_dicts(self.full_model, parts) if parts is not None else None

    def optimizer_state(self) -> Any:
        return self._gather(self.opt.state_dict())


_STRATEGIES: dict[str, type[_Parallel]] = {
    "single": _Parallel,
    "data_parallel": _DataParallel,
    "model_parallel": _ModelParallel,
    "pipeline_parallel": _PipelineParallel,
}


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Every rank runs this: restore, then per epoch train, score on rank 0, checkpoint, report."""
    import ray
    import ray.train.torch
    import torch.distributed as dist

    spec: TrainingJobSpec = config["spec"]
    data: PreparedData = ray.get(config["data"])
    hp: TorchHyperparameters = config["hparams"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives on NCCL use the current device
    distributed = world > 1
    pids = [os.getpid()]
    if distributed:
        pids = [None] * world
        dist.all_gather_object(pids, os.getpid())

    checkpoint, state, source = _pick_start(config)
    start = int(state["meta"]["epoch"]) if state else 0
    history = [h for h in (state["meta"].get("history", []) if state else []) if h.get("epoch", 0) <= start]

    _seed(hp.seed)
    model = build_model(spec.model, data.n_features, data.n_outputs)
    if state:
        model.load_state_dict(state["model"])
    meta = state["meta"] if state else {}
    same_layout = bool(state) and meta.get("strategy") == spec.strategy and meta.get("world_size") == world
    parallel = _STRATEGIES[spec.strategy](model, hp, data.task, state["optimizer"] if same_layout else None,
                                          rank, world, device)
    eval_model = build_model(spec.model, data.n_features, data.n_outputs).to(device) if rank == 0 else None

    progress = _Progress(config["database_url"], config["job_id"]) if rank == 0 else None
    restarts = 0
    if progress is not None:
        # The attempt token is new per fit_torch call: finding it means this loop ran before.
        previous = progress.read()
        if previous.get("train_attempt") == config["attempt"]:
            restarts = int(previous.get("restarts", 0)) + 1
        line = (f"training {spec.strategy} on {world} worker(s), pids {pids}; rank 0 holds "
                f"{parallel.local_params()} of {sum(p.numel() for p in model.parameters())} parameters")
        if checkpoint is not None:
            line += f"; continuing after epoch {start} from {checkpoint.path} ({source})"
        progress.write({"stage": "training", "epoch": start, "epochs": hp.epochs, "worker_pids": pids,
                        "restarts": restarts, "train_attempt": config["attempt"], "strategy": spec.strategy}, line)

    X, y = _tensors(data.X_train, data.y_train, data.task, device)
    for epoch in range(start + 1, hp.epochs + 1):
        total, rows = parallel.train_epoch(X, y, epoch)
        if distributed:
            sums = torch.tensor([total, float(rows)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            total, rows = float(sums[0]), int(sums[1])

        full_state = parallel.full_state()
        metrics: dict[str, Any] = {}
        if rank == 0:
            eval_model.load_state_dict(full_state)
            metrics = {"epoch": epoch, "train_loss": total / max(rows, 1),
                       **evaluate_model(eval_model, data, device, full=False)}
        if distributed:  # every rank reports the same metrics
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        history.append(metrics)

        # Every rank calls report once per epoch (it is a barrier); only rank 0 sends a checkpoint.
        if epoch % spec.checkpoint.frequency == 0 or epoch == hp.epochs:
            optimizer_state = parallel.optimizer_state()
            if rank == 0:
                meta = {"epoch": epoch, "metrics": metrics, "created_at": datetime.now(timezone.utc).isoformat(),
                        "strategy": spec.strategy, "world_size": world, "attempt": config["attempt"],
                        "restarts": restarts, "history": history}
                with tempfile.TemporaryDirectory(prefix="matih-ckpt-") as tmp:
                    _write_checkpoint(tmp, full_state, optimizer_state, meta)
                    ray.train.report(
                        metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                        checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}_{config['attempt'][:8]}r{restarts}",
                    )
                _wait_committed()
            else:
                ray.train.report(metrics)
        else:
            ray.train.report(metrics)

        if progress is not None:
            progress.write({"stage": "training", "epoch": epoch, "epochs": hp.epochs, "metrics": metrics,
                            "worker_pids": pids, "restarts": restarts},
                           f"epoch {epoch}/{hp.epochs}: {_describe(metrics)}")
        if hp.epoch_sleep_s:
            time.sleep(hp.epoch_sleep_s)


def _wait_committed() -> None:
    """Block until the controller has registered the checkpoint just reported. ``report``
    returns once the files are uploaded, but the controller learns of them only at its next
    poll of the workers; a worker killed in between would make the restart resume from the
    checkpoint before. Waiting here means that the epoch in the job's progress is always
    one a restart continues after."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    try:
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED, timeout_s=60)
    except Exception as exc:  # an alpha API: never let it stop the training
        log.warning("could not confirm that the checkpoint was registered: %s", exc)


# -- the driver -----------------------------------------------------------------------------


def _resume_checkpoint(uri: str | None, settings: Settings):
    if not uri:
        return None
    from pyarrow.fs import FileType
    from ray.train import Checkpoint

    from app.storage.s3 import resolve_uri

    fs_path, filesystem = resolve_uri(uri, settings)
    if filesystem.get_file_info(f"{fs_path.rstrip('/')}/{META_FILE}").type == FileType.NotFound:
        raise InvalidInput(
            f"checkpoint.resume_from {uri!r} holds no {META_FILE}; give a checkpoint path as listed by "
            "GET /v1/training/jobs/<id>/checkpoints",
            details={"field": "checkpoint.resume_from"},
        )
    return Checkpoint(path=fs_path, filesystem=filesystem)


def _check_plan(spec: TrainingJobSpec, data: PreparedData, hp: TorchHyperparameters, resume) -> None:
    """What would otherwise fail inside a worker, checked here where the error reaches the user."""
    allowed = epoch_metric_names(data.task)
    if spec.checkpoint.metric not in allowed:
        raise InvalidInput(
            f"checkpoint.metric {spec.checkpoint.metric!r} is not reported by {data.task} jobs; use one of "
            f"{', '.join(allowed)}",
            details={"field": "checkpoint.metric"},
        )
    model = build_model(spec.model, data.n_features, data.n_outputs)
    if spec.strategy == "pipeline_parallel":
        pipeline_stages(model, spec.resources.num_workers)
        if min(hp.batch_size, len(data.X_train)) < hp.microbatches:
            raise InvalidInput(
                f"microbatches ({hp.microbatches}) exceeds the batch size "
                f"({min(hp.batch_size, len(data.X_train))}); lower microbatches or raise batch_size",
                details={"field": "hyperparameters.microbatches"},
            )
    if resume is not None:
        state = _read_checkpoint(resume)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise InvalidInput(
                f"checkpoint.resume_from {spec.checkpoint.resume_from!r} does not fit this model: {exc}",
                details={"field": "checkpoint.resume_from"},
            ) from None


def fit_torch(spec: TrainingJobSpec, data: PreparedData, settings: Settings, job_id: str,
              hparams: dict[str, Any] | None = None) -> TorchResult:
    """Train ``spec.model`` with ``spec.strategy`` on Ray Train; needs a connected Ray cluster.
    ``data`` must be prepared with ``encode_labels=True`` (class indices). The run is named
    after ``job_id``, so a retried job finds its earlier checkpoints and continues from the
    latest (unless ``checkpoint.resume_from`` names another)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from app.storage.s3 import resolve_uri

    _check_inputs(spec, data)
    hp = torch_hparams(spec, hparams)
    resume = _resume_checkpoint(spec.checkpoint.resume_from, settings)
    _check_plan(spec, data, hp, resume)

    storage_uri = spec.checkpoint.storage_path or settings.train_storage_path()
    fs_path, filesystem = resolve_uri(storage_uri, settings)
    storage_dir = _checkpoint_uri(f"{fs_path.rstrip('/')}/{job_id}", storage_uri)
    res = spec.resources
    gpus = float(res.gpus_per_worker or 0)
    per_worker = {"CPU": res.cpus(settings.jobs.num_cpus), **({"GPU": gpus} if gpus > 0 else {})}
    ckpt = spec.checkpoint
    config = {
        "spec": spec, "data": ray.put(data), "hparams": hp, "job_id": job_id, "database_url": settings.database_url,
        "resume_from": resume, "attempt": uuid.uuid4().hex[:12],
    }
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=gpus > 0, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=job_id,
            storage_path=fs_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=ckpt.keep_best, checkpoint_score_attribute=ckpt.metric, checkpoint_score_order=ckpt.mode
            ),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends
        for cause in (getattr(exc, "worker_failures", None) or {}).values():
            cause = getattr(cause, "cause", cause)  # a RayTaskError carries the worker's exception
            if isinstance(cause, MatihError):
                raise cause from None
        raise ModelError(
            f"torch training of job {job_id} ({spec.strategy}, {res.num_workers} worker(s)) failed after "
            f"{spec.failure.max_failures} allowed restart(s): {type(exc).__name__}: {exc}"
        ) from exc

    best = result.get_best_checkpoint(ckpt.metric, ckpt.mode) if result.best_checkpoints else None
    chosen = best or result.checkpoint or resume
    if chosen is None:
        raise ModelError(f"torch training of job {job_id} reported no checkpoint; nothing to register")
    state = _read_checkpoint(chosen)
    latest = _read_checkpoint(result.checkpoint) if result.checkpoint is not None else state
    model = build_model(spec.model, data.n_features, data.n_outputs)
    model.load_state_dict(state["model"])
    metrics = evaluate_model(model, data, "cpu")
    return TorchResult(
        model=model.eval(),
        metrics=metrics,
        history=list(latest["meta"].get("history", [])),
        best_checkpoint=spec.checkpoint.resume_from if chosen is resume else _checkpoint_uri(chosen.path, storage_uri),
        storage_dir=storage_dir,
    )
