"""Parameter and MAC counts of the dense model a set of kept units would extract to.

``keep`` is one tensor per group, shaped ``(..., size)``: a 0/1 mask gives the exact count of the
extracted model; per-sample Bernoulli draws ``(B, size)`` give one count per sample (the
size-aware reward); keep probabilities with ``expected=True`` give the expected count under
independent Bernoulli masks, differentiable with respect to the probabilities.

With the input as a group (``deepiot.inputs``, group 0), a layer can lose every input
(DeepSense's gyroscope branch once the gyroscope is dropped): such a layer is **dead** and
dropped whole (:func:`effective_keep`), so its weights leave the cost and the extracted model
has no branch for it. A layer is alive when at least one input unit it depends on (through the
layers before it) is kept: probability ``1 - prod(1 - p_u)``. A layer's weight count is
(its inputs' effective keeps) x (its own units' keeps): the first factor is zero exactly when
the layer is dead, and it is independent of the second, so the expected cost stays exact; the
terms of its own units alone (bias, BatchNorm, recurrent weights) are weighted by the layer's
survival. (A hidden group that keeps no unit at all is not counted as killing the layers after
it: the final mask keeps at least one unit per group, and the sampled training masks rarely
drop a whole group.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
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
    depends: torch.Tensor | None  # input units the layer depends on (None: input not a group)


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
    depends = [torch.as_tensor(sorted(d), dtype=torch.long) if structure.inputs is not None else None
               for d in input_dependencies(structure)]
    for i, lay in enumerate(structure.layers):
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
                gates=lay.gates, bias=lay.bias, norms=len(lay.norms), depends=depends[i],
            )
        )
    return CostModel(tuple(layers), tuple(g.size for g in structure.groups),
                     dead_layers=structure.inputs is not None)


def input_dependencies(structure: Structure) -> list[set[int]]:
    """Per layer, the input units (of group 0) it depends on, directly or through the layers
    before it; empty sets when the input is not a group."""
    if structure.inputs is None:
        return [set() for _ in structure.layers]
    n_in = structure.inputs.size
    layer_of = {g.index: i for i, lay in enumerate(structure.layers) for g in structure.groups
                if g.module == lay.module and g.kind != "input"}
    group_at = np.zeros(structure.total_units + 1, np.int64) - 1
    for g in structure.groups:
        group_at[g.offset + 1 : g.offset + 1 + g.size] = g.index
    reads: list[set[int]] = []
    for lay in structure.layers:
        units: set[int] = set()
        for gid in np.unique(lay.in_ids):
            if 1 <= gid <= n_in:
                units.add(int(gid) - 1)
            elif gid > n_in:
                units |= reads[layer_of[int(group_at[gid])]]
        reads.append(units)
    return reads


def layer_alive(cm: CostModel, keep: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Per layer, whether (0/1) or how likely (probabilities) at least one input unit it
    depends on is kept; None (alive) unless the input is a group."""
    out: list[torch.Tensor | None] = []
    for lay in cm.layers:
        if not cm.dead_layers or lay.depends is None or not len(lay.depends):
            out.append(None)
            continue
        k = keep[0]
        out.append(1 - (1 - k[..., lay.depends.to(k.device)]).prod(-1))
    return out


def effective_keep(cm: CostModel, keep: list[torch.Tensor],
                   alive: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """``keep`` with the units of dead layers dropped (a layer that lost every input unit it
    depends on is dropped whole). Works on 0/1 masks, per-sample masks ``(B, size)`` and
    probabilities (then the marginal keep probabilities) alike; the identity unless the input
    is a group. ``alive``: :func:`layer_alive` of ``keep`` when the caller has it already."""
    if not cm.dead_layers:
        return keep
    eff = list(keep)
    for lay, a in zip(cm.layers, alive if alive is not None else layer_alive(cm, keep)):
        if a is None:
            continue
        for g in lay.groups:
            if g is not None:
                eff[g] = keep[g] * a[..., None]
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
    alive = layer_alive(cm, keep)
    eff = effective_keep(cm, keep, alive)  # what the next layers read
    params = torch.zeros((), dtype=torch.float64, device=dev)
    macs = torch.zeros((), dtype=torch.float64, device=dev)
    for lay, a in zip(cm.layers, alive):
        A = a if a is not None else 1.0  # a dead layer keeps nothing of its own either
        n_in = torch.tensor(float(lay.in_const), dtype=torch.float64, device=dev)
        for g, m in lay.in_mult.items():
            n_in = n_in + eff[g].to(torch.float64) @ m.to(dev)
        if lay.kind in ("lstm", "gru"):
            D, G = lay.directions, lay.gates
            for i, g in enumerate(lay.groups):
                h = _count(keep, g, lay.out_size)
                hh = _square(keep, g, lay.out_size, expected)
                x = n_in if i == 0 else D * _count(eff, lay.groups[i - 1], lay.out_size)
                w = G * (h * x + A * hh)
                params = params + D * (w + (A * 2 * G * h if lay.bias else 0))
                macs = macs + lay.positions * D * w
            continue
        n_out = _count(keep, lay.groups[0], lay.out_size)
        w = n_in * n_out * lay.kernel
        params = params + w + A * ((n_out if lay.bias else 0) + 2 * lay.norms * n_out)
        macs = macs + w * lay.positions
    return params, macs


def kept_fraction(cm: CostModel, keep: list[torch.Tensor], metric: str, *, expected: bool = False) -> torch.Tensor:
    """``metric`` ('params' or 'macs') of ``keep`` as a fraction of the unpruned model's."""
    i = 0 if metric == "params" else 1
    return cost(cm, keep, expected=expected)[i] / cm.full[i]
