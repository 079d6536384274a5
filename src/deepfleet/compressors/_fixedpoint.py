"""Fixed-point quantisation <IL, FL> (Gupta et al., ICML 2015), per weight tensor.

A value is ``code * 2^-FL`` with an integer ``code`` of ``bits`` = IL + FL bits (IL counts the
sign bit): signed codes span ``[-2^(bits-1), 2^(bits-1) - 1]``, so values span
``[-2^(IL-1), 2^(IL-1) - 2^-FL]``; anything outside **saturates** to the nearest bound.
Rounding is to **nearest** (ties to even, as ``torch.round``) or **stochastic**
(``floor(x 2^FL + u)``, ``u ~ U[0, 1)``: rounds up with probability equal to the fraction, so it
is unbiased). IL comes from the tensor's observed range (the fewest integer bits that cover
max |w|) unless given.

Training (``training``): ``none`` quantises once (post-training); ``ste`` fine-tunes float
shadow weights whose quantised values are used in the forward pass, the gradient passing
straight through inside the range; ``low-precision`` keeps the weights themselves in fixed
point, re-rounding after every update (Gupta et al.'s setting, where stochastic rounding keeps
updates smaller than one step alive in expectation).

Optional activation quantisation inserts a :class:`QuantAct` (the runtime's ``fake_quant`` op)
before every Linear/Conv/RNN layer, with <IL, FL> from the ranges observed on training data.
Weights export with the ``fixed`` encoding (integer codes, bit-packed below 8 bits).

The device decodes exactly the weights torch used, so without activation quantisation the
runtime matches torch to float rounding (~1e-7 relative). With it, an activation within float
rounding of a rounding boundary can land one step apart in numpy and torch (the GRU's numpy
recurrence rounds differently): the tolerance is then about one activation step (measured
1.7e-4 relative on deepsense, predictions identical).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from deepfleet.compressors._checks import check_bits, check_choice, check_layer_keys, check_positive
from deepfleet.compressors._encoding import Encoding, pack_codes
from deepfleet.compressors._export import record_values
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

ROUNDINGS = ("nearest", "stochastic")
TRAININGS = ("none", "ste", "low-precision")
_BITS = (2, 16)  # above 16 bits codes * 2^-FL stop being exact in float32 for wide ranges


def code_range(bits: int, signed: bool = True) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def int_bits_for(max_abs: float, signed: bool = True) -> int:
    """The fewest integer bits IL (sign bit included when ``signed``) with 2^IL' >= max_abs,
    IL' = IL - 1 for signed; may be zero or negative for small values."""
    if max_abs <= 0:
        return 1
    m, e = math.frexp(max_abs)  # max_abs = m 2^e, 0.5 <= m < 1: exact, unlike log2
    ceil_log2 = e - 1 if m == 0.5 else e
    return ceil_log2 + (1 if signed else 0)


def quantise(
    x: torch.Tensor, bits: int, frac_bits: int, *, rounding: str = "nearest",
    generator: torch.Generator | None = None, signed: bool = True,
) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x`` in <bits - frac_bits, frac_bits>, saturated."""
    scaled = x * 2.0**frac_bits  # exact: a power of two
    if rounding == "nearest":
        codes = torch.round(scaled)
    else:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        codes = torch.floor(scaled + noise)
    low, high = code_range(bits, signed)
    return codes.clamp(low, high)


class _FakeQuant(torch.autograd.Function):
    """Forward: the quantised value, exactly; backward: straight through inside the range."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, frac_bits: int, low: int, high: int) -> torch.Tensor:
        scaled = x * 2.0**frac_bits
        ctx.save_for_backward((scaled >= low) & (scaled <= high))
        return codes * 2.0**-frac_bits

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class QuantAct(nn.Module):
    """Fixed-point activations, round to nearest, saturating; the runtime's ``fake_quant`` op."""

    def __init__(self, bits: int, frac_bits: int, signed: bool):
        super().__init__()
        self.bits, self.frac_bits, self.signed = bits, frac_bits, signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = code_range(self.bits, self.signed)
        codes = quantise(x.detach(), self.bits, self.frac_bits, signed=self.signed)
        return _FakeQuant.apply(x, codes, self.frac_bits, low, high)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, frac_bits={self.frac_bits}, signed={self.signed}"


LEAF_MODULES[QuantAct] = OpInfo("fake_quant", "zero")  # q(0) = 0: it commutes with masks


@dataclass(frozen=True, kw_only=True)
class FixedPointConfig:
    """Settings of fixed-point quantisation (see the module docstring)."""

    bits: int = 8
    int_bits: int | None = None  # IL (sign included) for every tensor; None: from its range
    layer_bits: dict[str, int] = field(default_factory=dict)  # module or weight name -> bits
    layer_int_bits: dict[str, int] = field(default_factory=dict)
    rounding: str = "nearest"  # nearest | stochastic
    training: str = "ste"  # none | ste | low-precision
    act_bits: int | None = None  # quantise layer inputs to this many bits; None: float
    epochs: int | None = None  # fine-tuning epochs (None: the context's)
    lr: float | None = None

    def __post_init__(self) -> None:
        for b in (self.bits, *self.layer_bits.values()):
            check_bits("fixedpoint", b, _BITS)
        if self.act_bits is not None:
            check_bits("fixedpoint", self.act_bits, _BITS, key="act_bits")
        check_choice("fixedpoint", "rounding", self.rounding, choices=ROUNDINGS)
        check_choice("fixedpoint", "training", self.training, choices=TRAININGS)
        check_positive("fixedpoint", "epochs", self.epochs, allow_zero=True)
        check_positive("fixedpoint", "lr", self.lr)


def _lookup(table: dict[str, int], name: str, default: int | None) -> int | None:
    return table.get(name, table.get(name.rpartition(".")[0], default))


class FixedPointWeights(Reparam):
    """Float shadow weights behind fixed-point values; exact zeros of the input stay zero."""

    def __init__(self, model: nn.Module, specs: dict[str, tuple[int, int]], cfg: FixedPointConfig, *, seed: int):
        params = dict(model.named_parameters())
        self.specs, self.cfg, self.seed = specs, cfg, seed
        self.shadow = {n: params[n].detach().clone().requires_grad_(True) for n in specs}
        # zeros left by a sparsity method must survive (round(0) = 0, but training moves them)
        self.keep = {n: (w != 0) for n, w in self.shadow.items() if bool((w == 0).any())}
        self.gen = torch.Generator().manual_seed(seed)
        if cfg.training == "low-precision":
            self.after_step()

    def trainable(self) -> list[torch.Tensor]:
        return list(self.shadow.values())

    def _codes(self, name: str, w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        bits, frac = self.specs[name]
        if name in self.keep:
            w = w * self.keep[name]
        return quantise(w.detach(), bits, frac, rounding=self.cfg.rounding, generator=gen)

    def weights(self, *, final: bool) -> dict[str, torch.Tensor]:
        if final:
            return {n: enc.tensor(self.shadow[n]) for n, enc in self.encodings().items()}
        out = {}
        for n, w in self.shadow.items():
            bits, frac = self.specs[n]
            w_in = w * self.keep[n] if n in self.keep else w
            out[n] = _FakeQuant.apply(w_in, self._codes(n, w, self.gen), frac, *code_range(bits))
        return out

    def after_step(self) -> None:
        with torch.no_grad():
            for n, w in self.shadow.items():
                if self.cfg.training == "low-precision":  # the weights live in fixed point
                    w.copy_(self._codes(n, w, self.gen) * 2.0 ** -self.specs[n][1])
                elif n in self.keep:
                    w.mul_(self.keep[n])

    def encodings(self) -> dict[str, Encoding]:
        """The deployed codes; stochastic rounding draws from a fixed seed, so this is a
        deterministic function of the shadow weights."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        out = {}
        for n, w in self.shadow.items():
            bits, frac = self.specs[n]
            codes = self._codes(n, w, gen).cpu().numpy().astype(np.int64)
            arr, attrs = pack_codes(codes, bits)
            out[n] = Encoding(kind="fixed", shape=tuple(w.shape), arrays={"codes": arr},
                              attrs={"frac_bits": int(frac), **attrs}, bits=float(bits))
        return out


def _layer_inputs(gm: fx.GraphModule, X: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input (first argument) of every Linear/Conv/RNN node on the batch ``X``."""
    modules = dict(gm.named_modules())
    wanted = {n.args[0].name for n in gm.graph.nodes if classify(n, modules).category == "param"}
    values = record_values(gm.eval(), X)
    return {name: v for name, v in values.items() if name in wanted and isinstance(v, torch.Tensor)}


def insert_act_quant(gm: fx.GraphModule, X: torch.Tensor, bits: int) -> list[dict[str, Any]]:
    """Insert a QuantAct before every Linear/Conv/RNN of ``gm`` (in place), with IL from the
    range of its input on ``X``; unsigned where that input was never negative."""
    values = _layer_inputs(gm, X)
    modules = dict(gm.named_modules())
    info: list[dict[str, Any]] = []
    made: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if classify(node, modules).category != "param" or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if src.name not in made:
            v = values[src.name]
            signed = bool((v < 0).any())
            frac = bits - int_bits_for(float(v.abs().max()), signed)
            name = f"act_quant_{len(made)}"
            gm.add_submodule(name, QuantAct(bits, frac, signed))
            with gm.graph.inserting_after(src):
                made[src.name] = gm.graph.call_module(name, (src,))
            info.append({"before": str(node.target), "bits": bits, "frac_bits": frac, "signed": signed})
        node.replace_input_with(src, made[src.name])
    gm.graph.lint()
    gm.recompile()
    return info


class FixedPoint(BaseCompressor):
    """Fixed-point weights <IL, FL> per tensor, optional fixed-point activations."""

    name = "fixedpoint"
    stage = "quantise"
    config_class = FixedPointConfig
    keeps_zeros = True

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {} if options.bits is None else {"bits": options.bits}
        return out if options.rounding is None else {**out, "rounding": options.rounding}

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: FixedPointConfig = self.config
        gm = fold_batchnorm(model)  # quantise what the device multiplies with
        acts = insert_act_quant(gm, torch.as_tensor(data.X_train[:512]), cfg.act_bits) if cfg.act_bits else []
        names = weight_names(gm)
        known = set(names) | {n.rpartition(".")[0] for n in names}
        check_layer_keys(self.name, "layer_bits", cfg.layer_bits, names=known)
        check_layer_keys(self.name, "layer_int_bits", cfg.layer_int_bits, names=known)
        params = dict(gm.named_parameters())
        specs: dict[str, tuple[int, int]] = {}
        for n in names:
            bits = int(_lookup(cfg.layer_bits, n, cfg.bits))  # type: ignore[arg-type]
            il = _lookup(cfg.layer_int_bits, n, cfg.int_bits)
            il = int_bits_for(float(params[n].detach().abs().max())) if il is None else il
            specs[n] = (bits, bits - il)
        reparam = FixedPointWeights(gm, specs, cfg, seed=ctx.seed)
        train_cfg = with_overrides(ctx.finetune, 0 if cfg.training == "none" else cfg.epochs, cfg.lr)
        tuned, hist = finetune(gm, data, train_cfg, reparam=reparam, seed=ctx.seed, teacher=ctx.teacher,
                               desc="fixed-point", progress=ctx.progress)
        encodings = reparam.encodings()
        layers = []
        for n in names:
            bits, frac = specs[n]
            w = reparam.shadow[n].detach()
            scaled = w * 2.0**frac
            low, high = code_range(bits)
            layers.append({"weight": n, "bits": bits, "int_bits": bits - frac, "frac_bits": frac,
                           "saturated": float(((scaled < low) | (scaled > high)).float().mean())})
        info = {"settings": dataclasses.asdict(cfg), "layers": layers, "activations": acts,
                "epochs_trained": len(hist["val_accuracy"])}
        return Compressed(model=tuned, info=info, encodings=encodings)
