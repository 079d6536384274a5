"""SparseSep (Bhattacharya & Lane, SenSys 2016): sparse coding of weight matrices and
separation of convolution kernels.

* **Fully connected layers** (and, with ``recurrent``, the input-to-hidden and hidden-to-hidden
  matrices of LSTM/GRU layers): ``W (rows, cols) ~ C @ A``, a dictionary ``A`` of ``k`` atoms
  (unit-norm rows of length ``cols``) and sparse codes ``C (rows, k)`` with ``s`` nonzeros per
  row. The dictionary starts from the top ``k`` right singular vectors; codes come from batch
  orthogonal matching pursuit (OMP, on the Gram matrix); then ``iterations`` rounds of the method
  of optimal directions (least-squares atoms for the codes, renormalised, unused atoms restarted
  on the worst-coded row, codes again by OMP), keeping the best round. A Linear then runs as
  ``x @ A.T`` (a ``linear`` op of k outputs) followed by the sparse product with ``C`` (a
  ``sparse_linear`` op over its nonzeros only): ``k cols + nnz`` multiply-accumulates instead
  of ``rows cols``. Recurrent matrices are stored factored (atoms + sparse codes) and decoded to
  their dense product when the device loads the artifact: smaller, not faster.
* **Convolutions**: a Conv2d with a k_h x k_w kernel becomes a vertical (k_h x 1) conv to ``R``
  channels and a horizontal (1 x k_w) conv to the outputs (Jaderberg et al.'s separable filters,
  from the SVD of the kernel tensor arranged as (C k_h, O k_w)); a Conv1d (or a 2-D kernel with
  a unit side, which has no spatial pair to split) becomes a conv to ``R`` channels with the
  kernel and a 1x1 conv (the SVD of (O, C k)).

Sizes: with ``target`` (the command's ``--target-params``) one spectral-energy threshold for
every layer is found by bisection so that the model keeps at most ``target`` of its parameters
(atoms + nonzero codes + conv pairs + everything left dense); a layer's dictionary size / rank
is the smallest holding that much of its spectrum's energy, ``s = sparsity k``. ``atoms`` (a
fraction of each matrix's smaller side) and ``rank`` (of each conv's full rank) fix them
instead. A layer whose factorisation would not be smaller stays as it is. BatchNorm is folded
first. Then fine-tuning of atoms, nonzero codes (their support fixed) and everything else
(``epochs=0``: SparseSep's own no-retraining setting). The dictionaries and codes are final: no
method may change weights after it (like a quantiser's codes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deepfleet.compressors._checks import check_fraction, check_positive
from deepfleet.compressors._encoding import Encoding, float32_encoding, sparse_encoding
from deepfleet.compressors._extract import set_module
from deepfleet.compressors._finetune import Reparam, finetune, fold_batchnorm, with_overrides
from deepfleet.compressors._lowrank import factorise
from deepfleet.compressors._ops import trace
from deepfleet.compressors.base import BaseCompressor, Compressed, Context, Options
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class SparseSepConfig:
    target: float = 0.1  # kept fraction of the model's parameters (sizes by one energy threshold)
    atoms: float | None = None  # dictionary size, as a fraction of each matrix's smaller side
    sparsity: float = 0.25  # nonzero fraction of each code (s = sparsity * k, at least 1)
    rank: float | None = None  # separable rank, as a fraction of each conv's full rank
    recurrent: bool = True  # sparse-code LSTM/GRU matrices too (stored factored, run dense)
    iterations: int = 10  # dictionary-learning rounds after the SVD start
    epochs: int | None = None  # fine-tuning epochs (None: the context's; 0: none, as the paper)
    lr: float | None = None

    def __post_init__(self) -> None:
        check_fraction("sparsesep", "target", self.target)
        if self.atoms is not None:
            check_fraction("sparsesep", "atoms", self.atoms)
        check_fraction("sparsesep", "sparsity", self.sparsity)
        if self.rank is not None:
            check_fraction("sparsesep", "rank", self.rank)
        if not isinstance(self.recurrent, bool):
            raise ConfigError(f"sparsesep: recurrent must be true or false, but got {self.recurrent!r}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or not 0 <= self.iterations <= 1000:
            raise ConfigError(f"sparsesep: iterations must be a whole number in 0..1000, but got {self.iterations!r}")
        check_positive("sparsesep", "epochs", self.epochs, allow_zero=True)
        check_positive("sparsesep", "lr", self.lr)


# ---------------------------------------------------------------------------- sparse coding (pure)


def omp(W: torch.Tensor, A: torch.Tensor, s: int) -> torch.Tensor:
    """Codes C (rows, k) with at most ``s`` nonzeros per row such that C @ A ~ W, by batch
    orthogonal matching pursuit on the Gram matrix (all rows at once; float64 inside)."""
    W64, A64 = W.double(), A.double()
    P = W64 @ A64.T  # (rows, k) correlations of each row with each atom
    G = A64 @ A64.T  # (k, k)
    rows, k = P.shape
    s = min(s, k)
    chosen = torch.zeros(rows, 0, dtype=torch.long)
    C = torch.zeros_like(P)
    ridge = 1e-10 * torch.eye(s, dtype=torch.float64)
    for t in range(s):
        r = P - C @ G  # (rows, k) correlations of the residuals
        r.scatter_(1, chosen, 0.0)
        chosen = torch.cat([chosen, r.abs().argmax(1, keepdim=True)], 1)  # (rows, t + 1)
        Gs = G[chosen[:, :, None], chosen[:, None, :]] + ridge[: t + 1, : t + 1]  # (rows, t+1, t+1)
        x = torch.linalg.solve(Gs, P.gather(1, chosen))  # (rows, t + 1)
        C = torch.zeros_like(P).scatter_(1, chosen, x)
    return C


def sparse_code(W: torch.Tensor, k: int, s: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Dictionary A (k, cols) with unit-norm rows and codes C (rows, k), ``s`` nonzeros per row,
    minimising ||W - C A||_F: SVD start, then ``iterations`` MOD rounds (the best is kept).
    Returns (C, A, relative error ||W - C A|| / ||W||), float32."""
    W64 = W.detach().double().cpu()
    norm = float(W64.norm()) or 1.0
    A = torch.linalg.svd(W64, full_matrices=False)[2][:k]  # (k, cols), orthonormal rows
    C = omp(W64, A, s)
    best = (C, A, float((W64 - C @ A).norm()) / norm)
    for _ in range(iterations):
        A = torch.linalg.lstsq(C, W64).solution  # (k, cols): the best atoms for these codes
        residual = ((W64 - C @ A) ** 2).sum(1)
        for j in torch.nonzero(C.abs().sum(0) == 0).flatten().tolist():  # unused: restart on the worst row
            worst = int(residual.argmax())
            A[j] = W64[worst]
            residual[worst] = 0.0
        A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
        C = omp(W64, A, s)
        err = float((W64 - C @ A).norm()) / norm
        if err < best[2]:
            best = (C, A, err)
    C, A, err = best
    return C.float(), A.float(), err


def factored_encoding(C: torch.Tensor, A: torch.Tensor) -> Encoding:
    """W = C @ A as the artifact's ``factored`` encoding: float32 atoms, sparse codes."""
    codes = sparse_encoding(C.detach().cpu().numpy().astype(np.float32))
    assert codes is not None  # float32 values can always be stored sparse
    atoms = float32_encoding(A.detach().cpu().numpy())
    rows, cols = C.shape[0], A.shape[1]
    stored = int(A.numel()) + int(codes.stored or 0)
    return Encoding(kind="factored", shape=(rows, cols), arrays={}, parts={"atoms": atoms, "codes": codes},
                    bits=8.0 * (atoms.nbytes + codes.nbytes) / (rows * cols), stored=stored)


# ---------------------------------------------------------------------------- sizing (pure)


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    cum = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-30)
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=torch.float64)).clamp(max=len(s) - 1)) + 1


@dataclass
class _Plan:
    """One layer to factorise: what it is, its spectrum and how its cost grows with the rank."""

    name: str  # module (conv, linear) or parameter (recurrent matrix)
    kind: str  # linear | recurrent | conv_separable | conv_channels
    shape: tuple[int, ...]
    spectrum: torch.Tensor
    dense: int  # weights now
    size: int = 0  # chosen dictionary size / rank (0: left dense)

    def cost(self, k: int, sparsity: float) -> int:
        if self.kind in ("linear", "recurrent"):
            rows, cols = self.shape
            return k * cols + min(k, max(1, round(sparsity * k))) * rows
        out, C, *kern = self.shape
        if self.kind == "conv_separable":
            return k * (C * kern[0] + out * kern[1])
        return k * (C * math.prod(kern) + out)

    def stored(self, sparsity: float) -> int:
        return self.cost(self.size, sparsity) if self.size else self.dense


def _choose(plans: list[_Plan], cfg: SparseSepConfig, fixed: int, total: int) -> float | None:
    """Set every plan's size: from ``atoms``/``rank`` when given, else the largest common energy
    threshold that keeps the model within ``cfg.target`` of ``total`` parameters (``fixed`` of
    them not factorisable). Layers whose factorisation is not smaller stay dense. Returns the
    threshold (None when sizes were given)."""
    def given(p: _Plan) -> float | None:
        return cfg.atoms if p.kind in ("linear", "recurrent") else cfg.rank

    def size(p: _Plan, energy: float) -> int:
        g = given(p)
        k = max(1, round(g * len(p.spectrum))) if g is not None else _energy_rank(p.spectrum, energy)
        return k if p.cost(k, cfg.sparsity) < p.dense else 0

    def apply(energy: float) -> int:
        for p in plans:
            p.size = size(p, energy)
        return fixed + sum(p.stored(cfg.sparsity) for p in plans)

    if all(given(p) is not None for p in plans):
        apply(1.0)
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection: the kept count never falls as the threshold rises
        mid = (lo + hi) / 2
        if apply(mid) <= cfg.target * total:
            lo = mid
        else:
            hi = mid
    apply(lo)
    return lo


# ---------------------------------------------------------------------------- the model


def separate(layer: nn.Conv2d, rank: int) -> nn.Sequential:
    """A Conv2d as a vertical (k_h x 1, C -> rank) and a horizontal (1 x k_w, rank -> O) conv."""
    W = layer.weight.detach()  # (O, C, kh, kw)
    out, C, kh, kw = W.shape
    M = W.permute(1, 2, 0, 3).reshape(C * kh, out * kw).double()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    vert = (U[:, :rank] * root).T.reshape(rank, C, kh, 1)  # (R, C, kh, 1)
    horiz = (root[:, None] * Vh[:rank]).reshape(rank, out, 1, kw).permute(1, 0, 2, 3)  # (O, R, 1, kw)
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation  # type: ignore[misc]
    first = nn.Conv2d(C, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False)
    second = nn.Conv2d(rank, out, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                       bias=layer.bias is not None)
    first.weight.data.copy_(vert.to(W.dtype))
    second.weight.data.copy_(horiz.to(W.dtype).contiguous())
    if layer.bias is not None and second.bias is not None:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second).to(W.device)


def _conv_plan(name: str, mod: nn.Module) -> _Plan | None:
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)) or mod.groups != 1 or isinstance(mod.padding, str):
        return None
    W = mod.weight.detach()
    if W.dim() == 4 and W.shape[2] > 1 and W.shape[3] > 1:
        out, C, kh, kw = W.shape
        spectrum = torch.linalg.svdvals(W.permute(1, 2, 0, 3).reshape(C * kh, out * kw).double())
        return _Plan(name, "conv_separable", tuple(W.shape), spectrum, W.numel())
    spectrum = torch.linalg.svdvals(W.reshape(W.shape[0], -1).double())
    return _Plan(name, "conv_channels", tuple(W.shape), spectrum, W.numel())


def _plans(model: nn.Module, recurrent: bool) -> list[_Plan]:
    plans = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            W = mod.weight.detach()
            plans.append(_Plan(name, "linear", tuple(W.shape), torch.linalg.svdvals(W.double()), W.numel()))
        elif isinstance(mod, (nn.LSTM, nn.GRU)) and recurrent:
            for pname, w in mod.named_parameters(recurse=False):
                if pname.startswith("weight"):
                    full = f"{name}.{pname}" if name else pname
                    plans.append(_Plan(full, "recurrent", tuple(w.shape), torch.linalg.svdvals(w.detach().double()),
                                       w.numel()))
        elif (p := _conv_plan(name, mod)) is not None:
            plans.append(p)
    return plans


class CodedWeights(Reparam):
    """Weight matrices as (codes * support) @ atoms: atoms and nonzero codes train, the support
    (which codes are nonzero) stays; the final weights are the ``factored`` encoding's decoding."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.C = {n: c.to(device).requires_grad_(True) for n, (c, _) in factors.items()}
        self.A = {n: a.to(device).requires_grad_(True) for n, (_, a) in factors.items()}
        self.support = {n: (c != 0).to(device) for n, c in self.C.items()}

    def trainable(self) -> list[torch.Tensor]:
        return [*self.C.values(), *self.A.values()]

    def encodings(self) -> dict[str, Encoding]:
        return {n: factored_encoding((self.C[n] * self.support[n]).detach(), self.A[n].detach()) for n in self.C}

    def weights(self, *, final: bool) -> dict[str, torch.Tensor]:
        if final:
            return {n: e.tensor(self.C[n]) for n, e in self.encodings().items()}
        return {n: (self.C[n] * self.support[n]) @ self.A[n] for n in self.C}


class SparseSep(BaseCompressor):
    """SparseSep: sparse-coded fully connected (and recurrent) matrices, separable convolutions."""

    name = "sparsesep"
    stage = "quantise"  # its dictionaries and codes are final codes, as a quantiser's
    config_class = SparseSepConfig
    label = "a factorisation into dictionaries and sparse codes"

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        if options.metric != "params" and "target" not in given:
            raise ConfigError("sparsesep sizes its dictionaries by the parameters they keep; give "
                              "--target-params (or sparsesep.atoms / sparsesep.rank)")
        return {"target": options.target, **({"iterations": 2} if options.quick else {})}

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: SparseSepConfig = self.config
        gm = fold_batchnorm(model)
        dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
        total = sum(p.numel() for p in gm.parameters())
        plans = _plans(gm, cfg.recurrent)
        fixed = total - sum(p.dense for p in plans)
        energy = _choose(plans, cfg, fixed, total)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        layers: list[dict[str, Any]] = []
        params = dict(gm.named_parameters())
        for p in plans:
            row: dict[str, Any] = {"name": p.name, "kind": p.kind, "shape": list(p.shape), "weights_before": p.dense,
                                   "factorised": bool(p.size)}
            if p.size and p.kind in ("linear", "recurrent"):
                s = min(p.size, max(1, round(cfg.sparsity * p.size)))
                weight = params[p.name + ".weight"] if p.kind == "linear" else params[p.name]
                C, A, err = sparse_code(weight, p.size, s, cfg.iterations)
                factors[p.name + ".weight" if p.kind == "linear" else p.name] = (C, A)
                row.update(atoms=p.size, nonzeros_per_code=s, error=round(err, 6))
            elif p.size:
                mod = gm.get_submodule(p.name)
                pair = separate(mod, p.size) if p.kind == "conv_separable" else factorise(mod, p.size)  # type: ignore[arg-type]
                set_module(gm, p.name, pair)
                row.update(rank=p.size)
            row["weights_after"] = p.stored(cfg.sparsity)
            layers.append(row)
        gm = trace(gm)  # the conv pairs traced into their two convs (parameter names kept)
        reparam = CodedWeights(factors, dev)
        train_cfg = with_overrides(ctx.finetune, cfg.epochs, cfg.lr)
        tuned, hist = finetune(gm, data, train_cfg, reparam=reparam, seed=ctx.seed, teacher=ctx.teacher,
                               desc="sparsesep", progress=ctx.progress)
        encodings = reparam.encodings()
        for row in layers:  # what the fine-tuned codes store (a code that trained to 0 is dropped)
            enc = encodings.get(row["name"] + ".weight") or encodings.get(row["name"])
            if enc is not None:
                row["weights_after"] = enc.stored
                row["bits_per_weight"] = round(enc.bits, 4)
        info = {"settings": dataclasses.asdict(cfg), "layers": layers, "energy": energy,
                "epochs_trained": len(hist["val_accuracy"])}
        return Compressed(model=tuned.eval(), info=info, encodings=encodings)
