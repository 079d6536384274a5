"""Low-rank factorisation by truncated SVD (DeepX, Lane et al., 2016).

A Linear layer ``W (out, in)`` becomes two: ``in -> r`` (no bias) and ``r -> out`` (with the
bias), from ``W ~ (U sqrt(S)) (sqrt(S) V^T)`` truncated to rank r. A Conv1d/2d ``W (O, C, *k)``,
flattened to ``(O, C k)``, becomes a conv ``C -> r`` with the original kernel, stride, padding
and dilation, then a 1x1 conv ``r -> O`` with the bias. The pair replaces the layer as an
``nn.Sequential`` at the same name, so tracing and export see two ordinary layers.

The rank is the smallest whose singular values hold ``energy`` of the sum of squares (0.9 when
neither rule is given), or the largest whose pair keeps at most ``params`` of the layer's
weights. A layer is left alone
when the pair would not be smaller. Recurrent layers are not factorised. Then fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepfleet.compressors._checks import check_fraction, check_positive
from deepfleet.compressors._finetune import with_overrides
from deepfleet.compressors.base import BaseCompressor, Compressed, Context
from deepfleet.compressors.training import train
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    energy: float | None = None  # kept fraction of sum(s^2) per layer (0.9 if neither is given)
    params: float | None = None  # ... or kept fraction of each layer's weights (not both)
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.energy is not None and self.params is not None:
            raise ConfigError(
                f"lowrank: give energy or params, not both, but got energy={self.energy!r}, "
                f"params={self.params!r}"
            )
        if self.energy is not None:
            check_fraction("lowrank", "energy", self.energy)
        if self.params is not None:
            check_fraction("lowrank", "params", self.params)
        check_positive("lowrank", "epochs", self.epochs, allow_zero=True)
        check_positive("lowrank", "lr", self.lr)


def choose_rank(s: torch.Tensor, shape: tuple[int, int], cfg: LowRankConfig) -> int:
    """The rank for singular values ``s`` of a (rows, cols) matrix under ``cfg`` (at least 1)."""
    rows, cols = shape
    if cfg.params is not None:
        return max(1, int(cfg.params * rows * cols // (rows + cols)))
    energy = 0.9 if cfg.energy is None else cfg.energy
    cum = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-30)
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=torch.float64, device=cum.device)).item()) + 1


def factorise(layer: nn.Linear | nn.Conv1d | nn.Conv2d, rank: int) -> nn.Sequential:
    """The two-layer replacement of a Linear/Conv1d/Conv2d at ``rank``."""
    W = layer.weight.detach()
    flat = W.reshape(W.shape[0], -1).double()
    U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
    root = S[:rank].sqrt()
    A = (root[:, None] * Vh[:rank]).to(W.dtype)  # (r, in)
    B = (U[:, :rank] * root[None, :]).to(W.dtype)  # (out, r)
    bias = layer.bias is not None
    first: nn.Linear | nn.Conv1d | nn.Conv2d
    second: nn.Linear | nn.Conv1d | nn.Conv2d
    if isinstance(layer, nn.Linear):
        first, second = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=bias)
        first.weight.data.copy_(A)
        second.weight.data.copy_(B)
    else:
        conv: Any = type(layer)  # Conv1d or Conv2d: the same arguments
        first = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
        second = conv(rank, layer.out_channels, 1, bias=bias)
        first.weight.data.copy_(A.reshape(rank, *W.shape[1:]))
        second.weight.data.copy_(B.reshape(*B.shape, *([1] * (W.dim() - 2))))
    if layer.bias is not None and second.bias is not None:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(W.device)


class LowRank(BaseCompressor):
    """SVD factorisation of every Linear and Conv1d/2d layer, then fine-tuning."""

    name = "lowrank"
    stage = "structure"
    config_class = LowRankConfig

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: LowRankConfig = self.config
        model = copy.deepcopy(model)
        layers: list[dict[str, Any]] = []
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or getattr(mod, "groups", 1) != 1:
                continue
            rows, cols = mod.weight.shape[0], mod.weight[0].numel()
            s = torch.linalg.svdvals(mod.weight.detach().reshape(rows, -1).double())
            rank = min(choose_rank(s, (rows, cols), cfg), len(s))
            factored = rank * (rows + cols) < rows * cols
            if factored:
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, factorise(mod, rank))
            energy = float((s[:rank] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
            layers.append({"name": name, "kind": type(mod).__name__.lower(), "full_rank": len(s),
                           "rank": rank if factored else len(s), "factorised": factored,
                           "energy": round(energy, 6), "weights_before": rows * cols,
                           "weights_after": rank * (rows + cols) if factored else rows * cols})
        ft = with_overrides(ctx.finetune, cfg.epochs, cfg.lr)
        model, _ = train(model, data, ft, seed=ctx.seed, teacher=ctx.teacher, desc="low-rank",
                         progress=ctx.progress)
        return Compressed(model=model.eval(), info={"settings": dataclasses.asdict(cfg), "layers": layers})
