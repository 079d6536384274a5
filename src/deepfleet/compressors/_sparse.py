"""Sparsity baselines: magnitude pruning with retraining and dynamic network surgery.

* ``magnitude`` (Han et al., 2015): ``steps`` prune-retrain cycles; cycle i keeps the
  ``target^(i/steps)`` fraction of weights with the largest |w| (one global threshold over all
  weight matrices) and retrains with the pruned weights held at zero.
* ``dns`` (Guo et al., 2016, dynamic network surgery): one training run in which the mask is
  re-decided every ``update_every`` steps: weights with |w| below ``t (1 - margin)`` are cut,
  weights above ``t (1 + margin)`` are spliced back, t the global threshold of the current kept
  fraction (annealed from 1 to the target over ``anneal`` of the steps). The forward pass uses
  the masked weights, but the gradient updates every weight (straight-through), so a cut weight
  can grow back. The deployed mask keeps at most the target fraction (the largest |w| of the
  surviving weights).
* DyNS-Ext (DeepIoT's name for DNS on recurrent layers) is ``dns`` with ``recurrent`` on (the
  default): the input-to-hidden and hidden-to-hidden matrices of every LSTM/GRU layer and
  direction are cut and spliced like the others, each element by its own |w| against the one
  threshold; the recurrence runs on the masked matrices (torch.func substitutes them inside
  nn.LSTM/nn.GRU). ``recurrent: false`` is Guo et al.'s DNS, which knew fully connected and
  convolution layers only: recurrent matrices stay dense and count in full. A setting rather
  than a method of its own: the algorithm is the same, only the set of matrices differs, and a
  study can search it as ``dns.recurrent``.

Kept params count the nonzero weights; the target is a fraction of the pruned matrices. The
artifact stores each pruned tensor as its nonzeros with relative indices (the ``sparse``
encoding) when that is smaller, so bytes shrink with the pruning; runtimes decode it to the
dense tensor when loading, so the dense runtimes' work does not shrink. Biases and norms are not
pruned.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepfleet.compressors._checks import check_fraction, check_positive
from deepfleet.compressors._finetune import Reparam, finetune, weight_names, with_overrides
from deepfleet.compressors.base import BaseCompressor, Compressed, Context, Options
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError


def global_masks(weights: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Masks keeping exactly ``round(keep * total)`` (at least 1) weights of largest |w| overall."""
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    k = max(1, int(round(keep * flat.numel())))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = True
    masks, start = {}, 0
    for n, w in weights.items():
        masks[n] = chosen[start : start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks


def _threshold(weights: dict[str, torch.Tensor], keep: float) -> float:
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    k = max(1, int(round(keep * flat.numel())))
    return float(torch.topk(flat, k, sorted=True).values[-1])


class MaskedWeights(Reparam):
    """Weights times a 0/1 mask; ``straight_through`` passes the gradient to masked weights too."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], straight_through: bool):
        params = dict(model.named_parameters())
        self.w = {n: params[n].detach().clone().requires_grad_(True) for n in masks}
        self.mask = {n: m.clone() for n, m in masks.items()}
        self.straight_through = straight_through

    def trainable(self) -> list[torch.Tensor]:
        return list(self.w.values())

    def state(self) -> list[torch.Tensor]:
        return list(self.w.values()) + list(self.mask.values())

    def final_masks(self) -> dict[str, torch.Tensor]:
        return self.mask

    def weights(self, *, final: bool) -> dict[str, torch.Tensor]:
        if final:
            return {n: (self.w[n] * m).detach() for n, m in self.final_masks().items()}
        if self.straight_through:
            return {n: w + (w * self.mask[n] - w).detach() for n, w in self.w.items()}
        return {n: w * self.mask[n] for n, w in self.w.items()}


def recurrent_weight_names(model: nn.Module) -> list[str]:
    """The weight matrices of the model's LSTM/GRU layers (input-to-hidden and hidden-to-hidden,
    every layer and direction)."""
    names = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.LSTM, nn.GRU)):
            prefix = f"{mname}." if mname else ""
            names += [prefix + n for n, _ in mod.named_parameters(recurse=False) if n.startswith("weight")]
    return names


class SurgeryWeights(MaskedWeights):
    """Dynamic network surgery: the mask follows the weights (cut and splice with a margin)."""

    def __init__(self, model: nn.Module, cfg: DNSConfig, total_steps: int, names: list[str]):
        params = dict(model.named_parameters())
        super().__init__(model, {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, True)
        self.cfg, self.total, self.step = cfg, total_steps, 0

    def kept(self) -> float:
        """The kept fraction the schedule asks for now: geometric from 1 to the target."""
        return self.cfg.target ** min(1.0, self.step / max(1.0, self.cfg.anneal * self.total))

    def after_step(self) -> None:
        self.step += 1
        if self.step % self.cfg.update_every:
            return
        t = _threshold(self.w, self.kept())
        with torch.no_grad():
            for n, w in self.w.items():
                a = w.abs()
                self.mask[n] &= ~(a < t * (1 - self.cfg.margin))  # cut
                self.mask[n] |= a > t * (1 + self.cfg.margin)  # splice back

    def final_masks(self) -> dict[str, torch.Tensor]:
        # At most the target fraction: the band may leave a few more weights alive.
        total = sum(w.numel() for w in self.w.values())
        alive = sum(int(m.sum()) for m in self.mask.values())
        if alive <= max(1, round(self.cfg.target * total)):
            return self.mask
        survivors = {n: (w * self.mask[n]).detach() for n, w in self.w.items()}
        cut = global_masks(survivors, self.cfg.target)
        return {n: cut[n] & self.mask[n] for n in self.w}


@dataclass(frozen=True, kw_only=True)
class MagnitudeConfig:
    target: float = 0.1  # kept fraction of the weights (of all weight matrices together)
    steps: int = 3  # prune-retrain cycles
    epochs: int | None = None  # retraining epochs per cycle (None: the context's)
    lr: float | None = None

    def __post_init__(self) -> None:
        check_fraction("magnitude", "target", self.target)
        check_positive("magnitude", "steps", self.steps)
        check_positive("magnitude", "epochs", self.epochs, allow_zero=True)
        check_positive("magnitude", "lr", self.lr)


@dataclass(frozen=True, kw_only=True)
class DNSConfig:
    target: float = 0.1
    margin: float = 0.1  # relative half-width of the band between cutting and splicing
    anneal: float = 0.5  # fraction of the training steps spent descending to the target
    update_every: int = 5  # steps between mask updates
    recurrent: bool = True  # also LSTM/GRU matrices (DyNS-Ext); false: Linear and Conv only
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.recurrent, bool):
            raise ConfigError(f"dns: recurrent must be true or false, but got {self.recurrent!r}")
        check_fraction("dns", "target", self.target)
        check_fraction("dns", "margin", self.margin, closed_low=True)
        check_fraction("dns", "anneal", self.anneal, closed_low=True)
        check_positive("dns", "update_every", self.update_every)
        check_positive("dns", "epochs", self.epochs, allow_zero=True)
        check_positive("dns", "lr", self.lr)


def _layers(model: nn.Module, names: list[str]) -> tuple[list[dict[str, object]], float]:
    """Per weight matrix: its size and nonzero weights; and the kept fraction over all of them."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    nonzero = [int((params[n] != 0).sum()) for n in names]
    rows: list[dict[str, object]] = [{"weight": n, "params": s, "nonzero": z} for n, s, z in zip(names, sizes, nonzero)]
    return rows, sum(nonzero) / sum(sizes)


class _WeightPruner(BaseCompressor):
    """What magnitude pruning and DNS share: a target fraction of single weights."""

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        # Pruning single weights saves no MACs in a dense runtime: a MACs target cannot be
        # what it reaches.
        if options.metric != "params" and "target" not in given:
            raise ConfigError(f"{cls.name} prunes single weights, which saves no MACs in a dense "
                              "runtime; give --target-params")
        return {"target": options.target}


class Magnitude(_WeightPruner):
    """Iterative magnitude pruning with retraining (Han et al.); dense tensors with zeros."""

    name = "magnitude"
    stage = "sparsity"
    config_class = MagnitudeConfig

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        return {**super().settings_from(options, given), **({"steps": 1} if options.quick else {})}

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: MagnitudeConfig = self.config
        model = copy.deepcopy(model)
        names = weight_names(model)
        train_cfg = with_overrides(ctx.finetune, cfg.epochs, cfg.lr)
        params = dict(model.named_parameters())
        for i in range(1, cfg.steps + 1):
            keep = cfg.target ** (i / cfg.steps)
            masks = global_masks({n: params[n] for n in names}, keep)
            reparam = MaskedWeights(model, masks, straight_through=False)
            model, _ = finetune(model, data, train_cfg, reparam=reparam, seed=ctx.seed + i,
                                teacher=ctx.teacher, desc=f"magnitude {i}/{cfg.steps}", progress=ctx.progress)
        layers, kept = _layers(model, names)
        info = {"settings": dataclasses.asdict(cfg), "layers": layers, "kept_weights": kept}
        return Compressed(model=model, info=info, sparse=frozenset(names))


class DNS(_WeightPruner):
    """Dynamic network surgery (Guo et al.): prune and splice back with a margin, one run."""

    name = "dns"
    stage = "sparsity"
    config_class = DNSConfig

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: DNSConfig = self.config
        model = copy.deepcopy(model)
        train_cfg = with_overrides(ctx.finetune, cfg.epochs, cfg.lr)
        # no early stop before the schedule reaches the target
        train_cfg = dataclasses.replace(train_cfg, patience=max(train_cfg.patience, train_cfg.epochs))
        steps = train_cfg.epochs * math.ceil(len(data.y_train) / train_cfg.batch_size)
        skip = set() if cfg.recurrent else set(recurrent_weight_names(model))
        names = [n for n in weight_names(model) if n not in skip]
        reparam = SurgeryWeights(model, cfg, steps, names)
        model, _ = finetune(model, data, train_cfg, reparam=reparam, seed=ctx.seed, teacher=ctx.teacher,
                            desc="dns", progress=ctx.progress)
        layers, kept = _layers(model, names)
        info = {"settings": dataclasses.asdict(cfg), "layers": layers, "kept_weights": kept,
                "dense_recurrent": sorted(skip)}
        return Compressed(model=model, info=info, sparse=frozenset(names))
