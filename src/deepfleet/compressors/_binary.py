"""BinaryConnect (Courbariaux et al., 2015) and binarised activations (Hubara et al., 2016).

Every weight tensor becomes ``±H`` with one scale H per tensor (H = mean |w| of the trained
weights, the scale that minimises the L2 error of ``H sign(w)``). Training keeps float weights
clipped to ``[-H, H]``; the forward pass uses binary weights, **deterministic** ``H sign(w)`` or
**stochastic** ``+H`` with probability ``hard_sigmoid(w / H) = clip((w / H + 1) / 2, 0, 1)``;
the gradient with respect to the binary weights updates the float ones (straight-through). The
deployed weights are ``H sign(w)`` of the final float weights (sign(0) = +1) and export as the
``binary`` encoding: packed bits plus the scale.

With ``activations``, the hidden activations (ReLU, tanh, hardtanh ... feeding a later layer)
become :class:`SignActivation` (+1 / -1, the runtime's ``sign`` activation), trained with the
straight-through estimator of Hubara et al. (gradient passed where |x| <= 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from deepfleet.compressors._checks import check_positive
from deepfleet.compressors._encoding import Encoding
from deepfleet.compressors._finetune import (
    Reparam,
    finetune,
    fold_batchnorm,
    weight_names,
    with_overrides,
)
from deepfleet.compressors._ops import LEAF_MODULES, OpInfo, classify
from deepfleet.compressors.base import BaseCompressor, Compressed, Context, Options
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x.abs() <= 1)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


class SignActivation(nn.Module):
    """+1 where x >= 0, else -1; straight-through gradient inside [-1, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)


# sign(0) = +1 is not 0: a mask does not commute with it ("value").
LEAF_MODULES[SignActivation] = OpInfo("sign", "value")

_BINARISABLE = {"relu", "relu6", "tanh", "hardtanh", "leaky_relu", "elu", "gelu", "silu"}


@dataclass(frozen=True, kw_only=True)
class BinaryConfig:
    stochastic: bool = False  # stochastic BinaryConnect in training (deployed: deterministic)
    activations: bool = False  # binarise hidden activations too
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        check_positive("binary", "epochs", self.epochs, allow_zero=True)
        check_positive("binary", "lr", self.lr)


class BinaryWeights(Reparam):
    """Float weights clipped to [-H, H] behind binary ones."""

    def __init__(self, model: nn.Module, names: list[str], *, stochastic: bool, seed: int):
        params = dict(model.named_parameters())
        self.scale = {n: params[n].detach().abs().mean().item() for n in names}  # float32 value, any device
        self.real = {n: params[n].detach().clone().clamp(-self.scale[n], self.scale[n]).requires_grad_(True)
                     for n in names}
        self.stochastic = stochastic
        self.gen = torch.Generator().manual_seed(seed)

    def trainable(self) -> list[torch.Tensor]:
        return list(self.real.values())

    def _binary(self, name: str, w: torch.Tensor) -> torch.Tensor:
        H = self.scale[name]
        if self.stochastic:
            p = ((w.detach() / H + 1) / 2).clamp(0, 1)
            up = torch.rand(w.shape, generator=self.gen).to(w.device) < p
        else:
            up = w.detach() >= 0
        b = torch.where(up, H, -H).to(w.dtype)
        return w + (b - w).detach()  # straight-through: d loss / d w = d loss / d b

    def weights(self, *, final: bool) -> dict[str, torch.Tensor]:
        if final:
            return {n: enc.tensor(self.real[n]) for n, enc in self.encodings().items()}
        return {n: self._binary(n, w) for n, w in self.real.items()}

    def after_step(self) -> None:
        with torch.no_grad():
            for n, w in self.real.items():
                w.clamp_(-self.scale[n], self.scale[n])

    def encodings(self) -> dict[str, Encoding]:
        out = {}
        for n, w in self.real.items():
            bits = (w.detach() >= 0).cpu().numpy().reshape(-1)
            out[n] = Encoding(kind="binary", shape=tuple(w.shape), arrays={"bits": np.packbits(bits)},
                              attrs={"scale": self.scale[n]}, bits=1.0)
        return out


def binarise_activations(gm: fx.GraphModule) -> list[str]:
    """Replace hidden activations (those with a Linear/Conv/RNN after them) by SignActivation
    in place; return the replaced nodes' names."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    info = {n.name: classify(n, modules) for n in nodes}
    below: dict[str, bool] = {}
    for n in reversed(nodes):  # does a parametric layer read this node's value, directly or not?
        below[n.name] = any(info[u.name].category == "param" or below.get(u.name, False) for u in n.users)
    replaced: list[str] = []
    for n in nodes:
        if info[n.name].kind in _BINARISABLE and below[n.name]:
            name = f"sign_{len(replaced)}"
            gm.add_submodule(name, SignActivation())
            with gm.graph.inserting_after(n):
                new = gm.graph.call_module(name, (n.args[0],))
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
            replaced.append(n.name)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return replaced


class Binary(BaseCompressor):
    """BinaryConnect weights (±H per tensor), optionally binarised activations; trained."""

    name = "binary"
    stage = "quantise"
    config_class = BinaryConfig

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        if options.bits not in (None, 1):  # BinaryConnect: one bit, no setting to carry it
            raise ConfigError(f"binary supports bits 1 only, but got --bits {options.bits}")
        return {}

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: BinaryConfig = self.config
        gm = fold_batchnorm(model)
        replaced = binarise_activations(gm) if cfg.activations else []
        names = weight_names(gm)
        reparam = BinaryWeights(gm, names, stochastic=cfg.stochastic, seed=ctx.seed)
        tuned, hist = finetune(gm, data, with_overrides(ctx.finetune, cfg.epochs, cfg.lr), reparam=reparam,
                               seed=ctx.seed, teacher=ctx.teacher, desc="binary", progress=ctx.progress)
        encodings = reparam.encodings()
        layers = [{"weight": n, "scale": reparam.scale[n], "bits_per_weight": 1.0} for n in names]
        info = {"settings": dataclasses.asdict(cfg), "layers": layers, "binarised_activations": replaced,
                "epochs_trained": len(hist["val_accuracy"])}
        return Compressed(model=tuned, info=info, encodings=encodings)
