"""The torch training loop's pieces, shared by every strategy (``app.training.torch_strategies``)
and by ``train_in_process``, the loop of strategy ``single`` without Ray Train that a Ray Tune
trial runs: hyperparameters, batches, one epoch of steps, and the holdout metrics of an epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from app.errors import InvalidInput
from app.training.data import PreparedData
from app.training.spec import TorchHyperparameters, TrainingJobSpec
from app.training.torch_models import build_model
from app.training.validation import classification_metrics, regression_metrics

CLASSIFICATION_EPOCH_METRICS: tuple[str, ...] = ("val_loss", "train_loss", "accuracy", "f1", "log_loss")
REGRESSION_EPOCH_METRICS: tuple[str, ...] = ("val_loss", "train_loss", "rmse", "mae", "r2")


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
