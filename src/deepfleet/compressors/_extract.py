"""Extraction: the smaller dense model that computes what the masked model computes.

Given the kept units of every group, each layer keeps the rows (outputs) of its kept units and
the columns (inputs) fed by kept units; BatchNorm keeps its kept channels; an LSTM/GRU keeps the
matching rows of each gate block. A stacked RNN whose layers keep different numbers of units
becomes a :class:`StackedRNN` of single-layer RNNs (nn.LSTM needs one hidden size for all layers).

With the input as a group (group 0), the model still takes the full input (a device may feed
whatever it has; the dropped inputs are never read): every layer that reads the input gets a
:class:`Gather` of its kept input columns right before it, on its feature axis (there, and not
at the model's first op, because slicing and reshaping between the input and the layer, like
DeepSense's per-sensor slices, address the full input). A layer that lost every input is dead
(:func:`~deepfleet.compressors._cost.effective_keep`): its branch is cut from the concatenation
that joins it to the rest, and goes.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from deepfleet.compressors._cost import cost_model, effective_keep, input_dependencies
from deepfleet.compressors._graph import Layer, Structure
from deepfleet.compressors._masked import InputMask, Mask, MaskedRNN, rnn_weights
from deepfleet.compressors._ops import LEAF_MODULES, OpInfo
from deepfleet.compressors.training import device_of
from deepfleet.errors import ModelError


class StackedRNN(nn.Module):
    """Single-layer LSTMs/GRUs stacked, with per-layer hidden sizes; nn.LSTM's interface.

    Returns ``(output, h_n)`` (GRU) or ``(output, (h_n, c_n))`` (LSTM) where ``h_n``/``c_n`` are
    lists with one ``(B, H_l)`` tensor per layer and direction (sizes differ, so no stacking).
    """

    def __init__(self, layers: list[nn.RNNBase], dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = dropout
        self.batch_first = layers[0].batch_first
        self.bidirectional = layers[0].bidirectional
        self.kind = "lstm" if isinstance(layers[0], nn.LSTM) else "gru"

    def forward(self, x: torch.Tensor) -> Any:
        h_n: list[torch.Tensor] = []
        c_n: list[torch.Tensor] = []
        for i, rnn in enumerate(self.layers):
            x, state = rnn(x)
            h = state[0] if self.kind == "lstm" else state
            h_n.extend(h.unbind(0))
            if self.kind == "lstm":
                c_n.extend(state[1].unbind(0))
            if self.dropout and self.training and i < len(self.layers) - 1:
                x = nn.functional.dropout(x, self.dropout, True)
        return (x, (h_n, c_n)) if self.kind == "lstm" else (x, h_n)


LEAF_MODULES[StackedRNN] = OpInfo("stacked_rnn", "param")


class Gather(nn.Module):
    """``x.index_select(axis, indices)``: the kept input columns of the layer after it (the
    artifact op ``gather``)."""

    def __init__(self, axis: int, indices: list[int]):
        super().__init__()
        self.axis = axis
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, self.axis, self.indices)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, indices={len(self.indices)}"


LEAF_MODULES[Gather] = OpInfo("gather", "struct")


def rnn_layers(m: nn.Module) -> list[tuple[nn.RNNBase, int]]:
    """(module, layer index) for every layer of an nn.LSTM/GRU or a StackedRNN."""
    if isinstance(m, StackedRNN):
        return [(rnn, 0) for rnn in m.layers]  # type: ignore[misc]
    assert isinstance(m, nn.RNNBase)
    return [(m, i) for i in range(m.num_layers)]


def _global_keep(structure: Structure, keep: list[np.ndarray]) -> np.ndarray:
    k = np.ones(structure.total_units + 1, dtype=bool)
    for g in structure.groups:
        k[g.offset + 1 : g.offset + 1 + g.size] = keep[g.index]
    return k


def set_module(gm: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, new)


def _slice_linear_conv(mod: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(mod)
    w = mod.weight.detach()[out_idx][:, in_idx].clone()
    new.weight = nn.Parameter(w)
    if mod.bias is not None:
        new.bias = nn.Parameter(mod.bias.detach()[out_idx].clone())
    if isinstance(mod, nn.Linear):
        new.in_features, new.out_features = len(in_idx), len(out_idx)
    else:
        new.in_channels, new.out_channels = len(in_idx), len(out_idx)
    return new


def _slice_norm(bn: nn.Module, idx: torch.Tensor) -> nn.Module:
    new = copy.deepcopy(bn)
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            setattr(new, name, nn.Parameter(getattr(bn, name).detach()[idx].clone()))
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(new, name, getattr(bn, name)[idx].clone())
    new.num_features = len(idx)
    return new


def _slice_rnn(rnn: nn.RNNBase, lay: Layer, in_idx: torch.Tensor, kept: list[torch.Tensor]) -> nn.Module:
    """kept[l]: indices of kept hidden units of layer l (all units for an unpruned layer)."""
    D, G, H = lay.directions, lay.gates, rnn.hidden_size
    cls = type(rnn)
    w0 = rnn_weights(rnn, 0, 0)[0]
    like = {"device": w0.device, "dtype": w0.dtype}  # new layers live where the model does (e.g. CUDA)
    singles = []
    prev_cols = in_idx
    for layer, k in enumerate(kept):
        rows = torch.cat([q * H + k for q in range(G)])
        single = cls(
            len(prev_cols), len(k), num_layers=1, bias=rnn.bias, batch_first=rnn.batch_first,
            bidirectional=rnn.bidirectional, **like,
        )
        for d in range(D):
            src = rnn_weights(rnn, layer, d)
            dst = rnn_weights(single, 0, d)
            with torch.no_grad():
                dst[0].copy_(src[0][rows][:, prev_cols])
                dst[1].copy_(src[1][rows][:, k])
                if rnn.bias:
                    dst[2].copy_(src[2][rows])
                    dst[3].copy_(src[3][rows])
        singles.append(single)
        # the next layer reads this layer's kept units, direction by direction
        prev_cols = torch.cat([d * H + k for d in range(D)])
    if len({len(k) for k in kept}) == 1:
        merged = cls(
            len(in_idx), len(kept[0]), num_layers=len(kept), bias=rnn.bias,
            batch_first=rnn.batch_first, bidirectional=rnn.bidirectional, dropout=rnn.dropout, **like,
        )
        for layer, single in enumerate(singles):
            for d in range(D):
                with torch.no_grad():
                    for a, b in zip(rnn_weights(merged, layer, d), rnn_weights(single, 0, d)):
                        a.copy_(b)
        return merged
    return StackedRNN(singles, dropout=rnn.dropout)


def extract(structure: Structure, masked: fx.GraphModule, keep: list[np.ndarray]) -> fx.GraphModule:
    """The dense model with only ``keep`` units (one bool array per group), weights from ``masked``.

    ``masked`` is the masked model (or the original traced model) holding the trained weights.
    Every group keeps at least one unit. Raises ModelError if the result cannot run.
    """
    keep = [np.asarray(k, dtype=bool) for k in keep]
    for g, k in zip(structure.groups, keep):
        if k.shape != (g.size,):
            raise ValueError(f"keep mask for {g.name} has shape {k.shape}, expected ({g.size},)")
        if not k.any():
            raise ValueError(f"group {g.name} keeps no unit; keep at least one")
    gm = copy.deepcopy(masked)
    graph = gm.graph
    for node in list(graph.nodes):  # drop the masks: extraction makes them redundant
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), (Mask, InputMask)):
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            graph.erase_node(node)
            gm.delete_submodule(str(node.target))
    dead: set[int] = set()
    if structure.inputs is not None:
        eff = effective_keep(cost_model(structure), [torch.as_tensor(k, dtype=torch.float64) for k in keep])
        keep = [e.numpy() > 0 for e in eff]
        dead = {g.index for g in structure.groups if not keep[g.index].any()}
        if dead:
            _cut_dead(gm, structure, dead)
    n_in = structure.inputs.size if structure.inputs is not None else 0
    nodes = {n.name: n for n in graph.nodes}
    gkeep = _global_keep(structure, keep)
    for lay in structure.layers:
        if lay.node not in nodes:
            continue  # a dead layer, gone with its branch
        if n_in and lay.in_ids.size and lay.in_ids.max() <= n_in and not gkeep[lay.in_ids].all():
            _gather_before(gm, nodes[lay.node], lay, np.nonzero(gkeep[lay.in_ids])[0])
        mod = gm.get_submodule(lay.module)
        if isinstance(mod, MaskedRNN):
            mod = mod.rnn
        in_idx = torch.as_tensor(np.nonzero(gkeep[lay.in_ids])[0])
        if lay.kind in ("lstm", "gru"):
            kept = [
                torch.as_tensor(np.nonzero(keep[g])[0]) if g is not None else torch.arange(lay.out_size)
                for g in lay.groups
            ]
            set_module(gm, lay.module, _slice_rnn(mod, lay, in_idx, kept))  # type: ignore[arg-type]
            continue
        g = lay.groups[0]
        out_idx = torch.as_tensor(np.nonzero(keep[g])[0]) if g is not None else torch.arange(lay.out_size)
        set_module(gm, lay.module, _slice_linear_conv(mod, out_idx, in_idx))
        for bn in lay.norms:
            set_module(gm, bn, _slice_norm(gm.get_submodule(bn), out_idx))
    graph.lint()
    gm.recompile()
    return gm


def _cut_dead(gm: fx.GraphModule, structure: Structure, dead: set[int]) -> None:
    """Remove the branches of dead groups: drop each concatenation argument that carries only
    dead groups' units, then the code nobody reads. ModelError if a dead layer stays."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for name, parts in structure.cat_groups.items():
        node = nodes.get(name)
        if node is None:
            continue
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        kept = [t for t, gs in zip(tensors, parts) if not (gs and gs <= dead)]  # type: ignore[arg-type]
        if kept and len(kept) < len(tensors):  # type: ignore[arg-type]
            if node.args:
                node.args = (kept, *node.args[1:])
            else:
                node.kwargs = {**node.kwargs, "tensors": kept}
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    left = {n.name for n in graph.nodes}
    stuck = [lay.module for lay in structure.layers
             if lay.node in left and lay.groups[0] is not None and lay.groups[0] in dead]
    if stuck:
        raise ModelError(
            f"layer {stuck[0]!r} lost every input it reads, but its output reaches the rest of the "
            "model other than through a concatenation, so it cannot be removed; use "
            "deepiot.inputs=none for this model"
        )


def _gather_before(gm: fx.GraphModule, node: fx.Node, lay: Layer, columns: np.ndarray) -> None:
    """Insert a Gather of ``columns`` (on the layer's feature axis) before ``node``'s input."""
    axis = -1 if lay.kind in ("linear", "lstm", "gru") else 1
    name = f"deepiot_gather_{node.name}"
    gm.add_submodule(name, Gather(axis, [int(c) for c in columns]).to(device_of(gm)))
    with gm.graph.inserting_before(node):
        gathered = gm.graph.call_module(name, (node.args[0],))
    node.args = (gathered, *node.args[1:])


def input_masking_problem(structure: Structure) -> str | None:
    """Why masking the inputs of ``structure`` could fail at extraction, found before a search
    runs: for each layer that reads only some of the input units (directly or through other
    layers), extract with exactly those units dropped. None when every case extracts."""
    if structure.inputs is None:
        return None
    n_in = structure.inputs.size
    reads = input_dependencies(structure)
    tried: set[frozenset[int]] = set()
    for units in reads:
        rest = frozenset(range(n_in)) - units
        if not units or not rest or rest in tried:
            continue
        tried.add(rest)
        keep = [np.ones(g.size, bool) for g in structure.groups]
        keep[0][:] = False
        keep[0][list(rest)] = True
        try:
            extract(structure, structure.graph_module, keep)
        except ModelError as exc:
            return str(exc)
    return None


def check_extraction(
    masked: fx.GraphModule, set_masks: Any, extracted: nn.Module, x: torch.Tensor, tol: float = 1e-4
) -> float:
    """Max |extracted(x) - masked(x)| relative to max |masked(x)|; raise ModelError above ``tol``.

    ``set_masks()`` installs the deterministic mask on ``masked`` before the comparison.
    """
    masked.eval()
    extracted.eval()
    with torch.no_grad():
        set_masks()
        ref = masked(x)
        try:
            out = extracted(x)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            # a shape error is the user's forward() (sizes written into it); anything else is ours
            if "shape" in first or "size" in first:
                fix = ("a forward() with hard-coded sizes (e.g. x.view(-1, 800)) cannot shrink: use "
                       "torch.flatten(x, 1) or x.view(x.size(0), -1)")
            else:
                fix = "this is a bug in deepfleet's extraction for this architecture, please report it"
            raise ModelError(f"the extracted model fails to run ({first}); {fix}") from None
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if err > tol:
        raise ModelError(
            f"the extracted model differs from the masked model by {err:.2e} (relative); this "
            "is a bug in deepfleet's extraction for this architecture, please report it"
        )
    return err
