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

The pieces: ``app.training.torch_loop`` (batches, steps, holdout metrics, the in-process
loop), ``app.training.torch_strategies`` (one class per strategy),
``app.training.torch_checkpoints`` (checkpoint files, importable without torch) and
``app.onnx.torch_export`` (the trained model as ONNX).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.errors import InvalidInput, MatihError, ModelError
from app.training.data import PreparedData
from app.training.spec import TorchHyperparameters, TrainingJobSpec
from app.training.torch_checkpoints import META_FILE, _checkpoint_uri, _read_checkpoint, _write_checkpoint
from app.training.torch_loop import (
    _check_inputs,
    _describe,
    _seed,
    _tensors,
    epoch_metric_names,
    evaluate_model,
    torch_hparams,
)
from app.training.torch_models import build_model, pipeline_stages
from app.training.torch_strategies import _STRATEGIES

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)


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
