"""The built-in torch model zoo of training jobs: ``mlp``, ``cnn`` and ``tab_transformer``.

Every model takes the rows of a prepared dataset as they are (float32, ``[batch, n_features]``)
and returns ``[batch, n_outputs]`` (class logits, or one value for a regression), so the same
training loop, the same ONNX export and the same serving runtime work for all of them. Only
ops the TorchScript-based ONNX exporter handles with a dynamic batch axis are used.

The ``mlp`` is a plain ``nn.Sequential``, which is what lets ``pipeline_parallel`` cut it into
contiguous stages (:func:`pipeline_stages`) and map the stages' weights back onto the full
model's keys (:func:`merge_stage_state_dicts`) for checkpoints and evaluation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from app.errors import InvalidInput
from app.training.spec import TorchModelSpec


def build_model(spec: TorchModelSpec, n_features: int, n_outputs: int) -> nn.Module:
    """A freshly initialised zoo model for rows of ``n_features`` and ``n_outputs`` outputs
    (uses torch's global RNG: seed it first for the same weights on every worker)."""
    if n_features < 1 or n_outputs < 1:
        raise InvalidInput(f"a model needs n_features >= 1 and n_outputs >= 1 (got {n_features}, {n_outputs})")
    if spec.kind == "mlp":
        return _mlp(spec, n_features, n_outputs)
    if spec.kind == "cnn":
        return ConvNet(spec, n_features, n_outputs)
    if spec.kind == "tab_transformer":
        return TabTransformer(spec, n_features, n_outputs)
    raise InvalidInput(f"model.kind {spec.kind!r} is unknown; use mlp, cnn or tab_transformer",
                       details={"field": "model.kind"})


def _mlp(spec: TorchModelSpec, n_features: int, n_outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)


def image_shape(spec: TorchModelSpec, n_features: int) -> tuple[int, int, int]:
    """(channels, height, width) of one row for the cnn: the spec's, or 1 x n x n."""
    if spec.image_shape is not None:
        c, h, w = spec.image_shape
        if min(c, h, w) < 1 or c * h * w != n_features:
            raise InvalidInput(
                f"model.image_shape {list(spec.image_shape)} holds {c * h * w} values but the rows have "
                f"{n_features} features; give a (channels, height, width) whose product is {n_features}",
                details={"field": "model.image_shape"},
            )
        return c, h, w
    side = math.isqrt(n_features)
    if side * side != n_features:
        raise InvalidInput(
            f"the cnn reads each row as an image, but {n_features} features is not a square (n x n); "
            "set model.image_shape to (channels, height, width) with that many values",
            details={"field": "model.image_shape"},
        )
    return 1, side, side


class ConvNet(nn.Module):
    """Conv(3x3, same padding) + ReLU per ``channels`` entry, each followed by a 2x2 max-pool
    while the image is at least 2x2, then a linear head over the flattened maps."""

    def __init__(self, spec: TorchModelSpec, n_features: int, n_outputs: int):
        super().__init__()
        self.shape = image_shape(spec, n_features)
        c, h, w = self.shape
        layers: list[nn.Module] = []
        for out in spec.channels:
            layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * h * w, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.shape
        z = self.features(x.reshape(-1, c, h, w))
        return self.head(torch.flatten(z, 1))


class TabTransformer(nn.Module):
    """Each feature becomes a token (its value times a learned per-feature vector plus a
    per-feature bias, so the token also says which feature it is); a transformer encoder mixes
    the tokens; their mean feeds a linear head."""

    def __init__(self, spec: TorchModelSpec, n_features: int, n_outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_features, spec.d_model) * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_features, spec.d_model))
        layer = nn.TransformerEncoderLayer(
            spec.d_model, spec.heads, dim_feedforward=2 * spec.d_model, dropout=spec.dropout, batch_first=True
        )
        # enable_nested_tensor only pays off with padding masks, which rows never have.
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.unsqueeze(-1) * self.weight + self.bias
        z = self.encoder(tokens).mean(dim=1)
        return self.head(self.norm(z))


# -- pipeline stages ------------------------------------------------------------------------


def _blocks(model: nn.Module) -> list[tuple[int, int]]:
    """[start, end) child ranges of an mlp: each Linear with the activation / dropout after it."""
    if not isinstance(model, nn.Sequential):
        raise InvalidInput(
            f"pipeline_parallel splits an nn.Sequential (the mlp); got {type(model).__name__}",
            details={"field": "model.kind"},
        )
    starts = [i for i, m in enumerate(model) if any(True for _ in m.parameters(recurse=True))]
    if not starts:
        raise InvalidInput("the model has no layers with parameters to split into stages")
    starts[0] = 0
    return [(s, e) for s, e in zip(starts, starts[1:] + [len(model)])]


def _stage_bounds(model: nn.Module, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous child ranges, one per stage, minimising the largest stage's parameter count
    (exact linear partition over the blocks; the blocks are few)."""
    blocks = _blocks(model)
    if not 1 <= num_stages <= len(blocks):
        raise InvalidInput(
            f"cannot cut a model of {len(blocks)} layers into {num_stages} stages; use between 1 and "
            f"{len(blocks)} workers (or add hidden layers)",
            details={"field": "resources.num_workers"},
        )
    sizes = [sum(p.numel() for i in range(s, e) for p in model[i].parameters()) for s, e in blocks]
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # cost[k][i]: the smallest possible largest stage when blocks[:i] form k stages.
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    cost[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n - (num_stages - k) + 1):
            for j in range(k - 1, i):
                c = max(cost[k - 1][j], prefix[i] - prefix[j])
                if c < cost[k][i]:
                    cost[k][i], cut[k][i] = c, j
    ends, i = [], n
    for k in range(num_stages, 0, -1):
        ends.append(i)
        i = cut[k][i]
    ends.reverse()
    starts = [0] + ends[:-1]
    return [(blocks[s][0], blocks[e - 1][1]) for s, e in zip(starts, ends)]


def pipeline_stages(model: nn.Module, num_stages: int) -> list[nn.Sequential]:
    """``model`` (an mlp) cut into ``num_stages`` contiguous ``nn.Sequential`` parts with
    balanced parameter counts. The parts share their layers with ``model``."""
    return [nn.Sequential(*list(model)[s:e]) for s, e in _stage_bounds(model, num_stages)]


def stage_key_maps(model: nn.Module, num_stages: int) -> list[dict[str, str]]:
    """Per stage, its state-dict keys -> the full model's keys ("0.weight" of the second stage
    may be "4.weight" of the model)."""
    maps = []
    for s, e in _stage_bounds(model, num_stages):
        mapping = {}
        for local, index in enumerate(range(s, e)):
            for key in model[index].state_dict():
                mapping[f"{local}.{key}"] = f"{index}.{key}"
        maps.append(mapping)
    return maps


def merge_stage_state_dicts(model: nn.Module,
                            stage_state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full model's state dict from the state dicts of its stages (in stage order), as cut
    by :func:`pipeline_stages` with ``len(stage_state_dicts)`` stages."""
    maps = stage_key_maps(model, len(stage_state_dicts))
    full: dict[str, torch.Tensor] = {}
    for mapping, state in zip(maps, stage_state_dicts):
        unknown = set(state) - set(mapping)
        if unknown:
            raise InvalidInput(f"stage state dict has keys the model does not: {sorted(unknown)}")
        full.update({mapping[k]: v for k, v in state.items()})
    missing = set(model.state_dict()) - set(full)
    if missing:
        raise InvalidInput(f"stage state dicts miss keys of the model: {sorted(missing)}")
    return full


def split_state_dict(model: nn.Module, full: dict[str, torch.Tensor], num_stages: int) -> list[dict[str, torch.Tensor]]:
    """The inverse of :func:`merge_stage_state_dicts`: a full state dict cut per stage."""
    return [{local: full[key] for local, key in mapping.items()} for mapping in stage_key_maps(model, num_stages)]
