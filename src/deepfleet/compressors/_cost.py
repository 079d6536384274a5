"""Parameter and MAC counts of the dense model a set of kept units would extract to.

``keep`` is one tensor per group, shaped ``(..., size)``: a 0/1 mask gives the exact count of the
extracted model; per-sample Bernoulli draws ``(B, size)`` give one count per sample (the
size-aware reward); keep probabilities with ``expected=True`` give the expected count under
independent Bernoulli masks, differentiable with respect to the probabilities.

With the input as a group (``deepiot.inputs``), a layer can lose every input (DeepSense's
gyroscope branch once the gyroscope is dropped): such a layer is **dead** and dropped whole,
with everything that reads only it (:func:`effective_keep`), so its weights leave the cost and
the extracted model has no branch for it. For probabilities the layer's survival is
1 - prod(1 - q) over its inputs' effective keeps q, treated as independent (exact for one
input unit, an approximation of the expectation otherwise; exact for 0/1 masks).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from deepfleet.compressors._graph import Structure


@dataclass(frozen=True)
class LayerCost:
    module: str
    kind: str
    in_const: int  # input features not fed by any prunable unit
    in_mult: dict[int, torch.Tensor]  # group -> (size,) number of input features per unit
    groups: tuple[int | None, ...]
    out_size: int
    kernel: int
    positions: int
    directions: int
    gates: int
    bias: bool
    norms: int  # BatchNorm layers on this layer's output (2 parameters per channel each)
    feeds: dict[int, torch.Tensor]  # group -> indices of its units that feed this layer


@dataclass(frozen=True)
class CostModel:
    layers: tuple[LayerCost, ...]
    group_sizes: tuple[int, ...]
    dead_layers: bool = False  # layers may lose every input (the input is a group)

    @cached_property
    def full(self) -> tuple[float, float]:
        """(params, MACs) of the unpruned model, counted once: the search asks for fractions
        thousands of times (a mask bisection per iteration)."""
        params, macs = cost(self, full_keep(self))
        return float(params), float(macs)


def cost_model(structure: Structure) -> CostModel:
    layers = []
    for lay in structure.layers:
        mult: dict[int, torch.Tensor] = {}
        for g in structure.groups:
            sel = (lay.in_ids > g.offset) & (lay.in_ids <= g.offset + g.size)
            if sel.any():
                counts = torch.bincount(
                    torch.as_tensor(lay.in_ids[sel] - g.offset - 1), minlength=g.size
                )
                mult[g.index] = counts.double()
        layers.append(
            LayerCost(
                module=lay.module, kind=lay.kind, in_const=int((lay.in_ids == 0).sum()),
                in_mult=mult, groups=tuple(lay.groups), out_size=lay.out_size,
                kernel=lay.kernel, positions=lay.positions, directions=lay.directions,
                gates=lay.gates, bias=lay.bias, norms=len(lay.norms),
                feeds={g: torch.nonzero(m > 0)[:, 0] for g, m in mult.items()},
            )
        )
    return CostModel(tuple(layers), tuple(g.size for g in structure.groups),
                     dead_layers=structure.inputs is not None)


def _alive(keep: list[torch.Tensor], feeds: dict[int, torch.Tensor]) -> torch.Tensor:
    """Probability (or 0/1 indicator) that at least one of the fed units is kept."""
    none_kept: torch.Tensor | float = 1.0
    for g, idx in feeds.items():
        k = keep[g]
        none_kept = none_kept * (1 - k[..., idx.to(k.device)]).prod(-1)
    return 1 - none_kept  # type: ignore[return-value]


def effective_keep(cm: CostModel, keep: list[torch.Tensor]) -> list[torch.Tensor]:
    """``keep`` with the units of dead layers dropped: a layer all of whose inputs are dropped
    is dropped itself (and so on downstream), in topological order. Works on 0/1 masks, per-
    sample masks ``(B, size)`` and probabilities alike; the identity unless ``cm.dead_layers``."""
    if not cm.dead_layers:
        return keep
    eff = list(keep)
    for lay in cm.layers:
        alive = _alive(eff, lay.feeds) if lay.in_const == 0 and lay.feeds else None
        for i, g in enumerate(lay.groups):
            if g is None:
                continue
            if i > 0:  # a stacked recurrent layer reads the layer below
                prev = lay.groups[i - 1]
                alive = _alive(eff, {prev: torch.arange(cm.group_sizes[prev])}) if prev is not None else None
            if alive is not None:
                eff[g] = eff[g] * alive[..., None]
    return eff


def full_keep(cm: CostModel) -> list[torch.Tensor]:
    return [torch.ones(n, dtype=torch.float64) for n in cm.group_sizes]


def _count(keep: list[torch.Tensor], g: int | None, fixed: int) -> torch.Tensor:
    if g is not None:
        return keep[g].sum(-1)
    return torch.tensor(float(fixed), dtype=torch.float64, device=keep[0].device)


def _square(keep: list[torch.Tensor], g: int | None, fixed: int, expected: bool) -> torch.Tensor:
    """(number kept)^2, or its expectation sum(p)^2 + sum(p(1-p)) for probabilities."""
    n = _count(keep, g, fixed)
    if expected and g is not None:
        p = keep[g]
        return n * n + (p * (1 - p)).sum(-1)
    return n * n


def cost(cm: CostModel, keep: list[torch.Tensor], *, expected: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (params, MACs per sample) of the model with ``keep`` units, as float64 tensors on
    the device of ``keep`` (the counts follow the masks, so a search on CUDA stays there)."""
    dev = keep[0].device
    keep = effective_keep(cm, keep)
    params = torch.zeros((), dtype=torch.float64, device=dev)
    macs = torch.zeros((), dtype=torch.float64, device=dev)
    for lay in cm.layers:
        n_in = torch.tensor(float(lay.in_const), dtype=torch.float64, device=dev)
        for g, m in lay.in_mult.items():
            n_in = n_in + keep[g].to(torch.float64) @ m.to(dev)
        if lay.kind in ("lstm", "gru"):
            D, G = lay.directions, lay.gates
            for i, g in enumerate(lay.groups):
                h = _count(keep, g, lay.out_size)
                hh = _square(keep, g, lay.out_size, expected)
                x = n_in if i == 0 else D * _count(keep, lay.groups[i - 1], lay.out_size)
                w = G * (h * x + hh)
                params = params + D * (w + (2 * G * h if lay.bias else 0))
                macs = macs + lay.positions * D * w
            continue
        n_out = _count(keep, lay.groups[0], lay.out_size)
        w = n_in * n_out * lay.kernel
        params = params + w + (n_out if lay.bias else 0) + 2 * lay.norms * n_out
        macs = macs + w * lay.positions
    return params, macs


def kept_fraction(cm: CostModel, keep: list[torch.Tensor], metric: str, *, expected: bool = False) -> torch.Tensor:
    """``metric`` ('params' or 'macs') of ``keep`` as a fraction of the unpruned model's."""
    i = 0 if metric == "params" else 1
    return cost(cm, keep, expected=expected)[i] / cm.full[i]
