"""How each strategy trains one rank's share of the model: ``single`` (the plain model),
``data_parallel`` (DDP), ``model_parallel`` (FSDP2) and ``pipeline_parallel`` (GPipe stages),
and how the whole model's weights and the optimizer state reach rank 0 for a checkpoint.
The Ray Train worker loop (``app.training.torch_train``) picks one from ``_STRATEGIES``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from app.training.spec import TorchHyperparameters
from app.training.torch_loop import _batches, _cpu_state, _loss_fn, _optimizer, _train_steps
from app.training.torch_models import merge_stage_state_dicts, pipeline_stages


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
