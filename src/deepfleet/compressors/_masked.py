"""The masked network of DeepIoT: the model with a keep mask on every prunable group.

``masked_model(structure)`` returns a copy of the traced model with a :class:`Mask` after each
Linear/Conv group's mask point and every recurrent layer wrapped in :class:`MaskedRNN`, all
reading one :class:`MaskState`. A mask is either per sample, ``(B, size)`` (training: each sample
its own Bernoulli draw), or one vector ``(size,)`` shared by the batch (the deterministic mask).

When the input is a group (``deepiot.inputs``), an :class:`InputMask` right after the input
multiplies every input element by its unit's mask, and the state applies the masks through
:func:`~deepfleet.compressors._cost.effective_keep`: a layer that has lost every input is
dropped too (its output is 0, as in the extracted model that no longer has it).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deepfleet.compressors._cost import cost_model, effective_keep
from deepfleet.compressors._graph import Structure
from deepfleet.compressors._ops import LEAF_MODULES, OpInfo


class MaskState:
    """The masks currently applied, one entry per group (None = unmasked). ``resolve`` maps the
    masks given to the masks applied (dead layers dropped when the input is a group)."""

    def __init__(self, n_groups: int, resolve: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None):
        self.masks: list[torch.Tensor | None] = [None] * n_groups
        self.resolve = resolve

    def set(self, masks: list[torch.Tensor] | None) -> None:
        if masks is None:
            self.masks = [None] * len(self.masks)
            return
        masks = list(masks)
        self.masks = list(self.resolve(masks)) if self.resolve is not None else masks  # type: ignore[arg-type]


def _broadcast(z: torch.Tensor, ndim: int, axis: int, batch: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = z.shape[-1]
    if z.dim() == 2:
        if z.shape[0] != batch:
            raise ValueError(f"per-sample mask for {z.shape[0]} samples applied to a batch of {batch}")
        shape[0] = batch
    return z.reshape(shape)


class Mask(nn.Module):
    """Multiplies its input by the current mask of one group along the channel axis."""

    def __init__(self, state: MaskState, group: int, axis: int, ndim: int):
        super().__init__()
        self.state, self.group, self.axis, self.ndim = state, group, axis, ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.state.masks[self.group]
        if z is None:
            return x
        return x * _broadcast(z.to(x.dtype), self.ndim, self.axis, x.shape[0])


class InputMask(nn.Module):
    """Multiplies each input element by the mask of its unit (``unit_of``: the sample shape,
    -1 for elements no layer reads, which pass unchanged)."""

    def __init__(self, state: MaskState, unit_of: torch.Tensor):
        super().__init__()
        self.state = state
        self.register_buffer("index", torch.where(unit_of >= 0, unit_of, int(unit_of.max()) + 1).long(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.state.masks[0]
        if z is None:
            return x
        z = z.to(x.dtype)
        z = torch.cat([z, torch.ones_like(z[..., :1])], -1)  # the column of unread elements
        return x * z[..., self.index]  # (B, *sample) or (*sample): per sample or shared


def rnn_weights(rnn: nn.RNNBase, layer: int, direction: int) -> tuple[torch.Tensor, ...]:
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    w = (getattr(rnn, "weight_ih" + sfx), getattr(rnn, "weight_hh" + sfx))
    if rnn.bias:
        w += (getattr(rnn, "bias_ih" + sfx), getattr(rnn, "bias_hh" + sfx))
    return w


# A pre-activation this large saturates a sigmoid to exactly 1 (or 0) in float32 and float64.
_SATURATE = 1e4


def _gate_rows(kind: str, H: int) -> slice:
    """Rows of the gate that holds a unit at 0 when saturated: a GRU's update gate (to 1: h
    keeps its initial 0), an LSTM's output gate (to 0: h = o * tanh(c) = 0)."""
    return slice(H, 2 * H) if kind == "gru" else slice(3 * H, 4 * H)


def _masked_layer(rnn: nn.RNNBase, kind: str, x: torch.Tensor, layer: int, z: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer (both directions) of ``rnn`` over batch-first ``x`` with keep mask ``z``
    (B, H) or None: (outputs (B, T, D*H), final h (D, B, H), final c for an LSTM).

    The mask enters as extra inputs: ``1 - z`` (per sample, constant over time) with a weight
    of +-_SATURATE on the gate that pins a dropped unit to 0, so torch's whole-sequence kernel
    (torch.gru / torch.lstm) runs the masked recurrence exactly (a dropped unit is exactly 0 at
    every step, as DeepIoT's h_t = z * cell(x_t, h_{t-1})) with no Python loop over time steps:
    1.7x faster than a loop of fused cells on DeepSense's GRU over 100 steps.
    """
    D = 2 if rnn.bidirectional else 1
    H = rnn.hidden_size
    B, T, _ = x.shape
    params: list[torch.Tensor] = []
    extra = None
    if z is not None:
        w0 = rnn_weights(rnn, layer, 0)[0]
        extra = w0.new_zeros(w0.shape[0], H)
        sign = 1.0 if kind == "gru" else -1.0
        extra[_gate_rows(kind, H)] = sign * _SATURATE * torch.eye(H, dtype=w0.dtype, device=w0.device)
        x = torch.cat([x, (1 - z.to(x.dtype))[:, None, :].expand(B, T, H)], 2)
    for d in range(D):
        w = list(rnn_weights(rnn, layer, d))
        if extra is not None:
            w[0] = torch.cat([w[0], extra], 1)
        params += w
    h0 = x.new_zeros(D, B, H)
    if kind == "lstm":
        out, h, c = torch.lstm(x, (h0, h0), params, rnn.bias, 1, 0.0, rnn.training, D == 2, True)
        return out, h, c
    out, h = torch.gru(x, h0, params, rnn.bias, 1, 0.0, rnn.training, D == 2, True)
    return out, h, None


def masked_rnn(rnn: nn.RNNBase, x: torch.Tensor, masks: list[torch.Tensor | None]) -> Any:
    """nn.LSTM / nn.GRU semantics (zero initial state) with a keep mask per layer."""
    kind = "lstm" if isinstance(rnn, nn.LSTM) else "gru"
    if not rnn.batch_first:
        x = x.transpose(0, 1)
    h_n, c_n = [], []
    layer_in = x
    for layer in range(rnn.num_layers):
        z = masks[layer]
        if z is not None and z.dim() == 1:
            z = z[None].expand(x.shape[0], -1)
        layer_in, h, c = _masked_layer(rnn, kind, layer_in, layer, z)
        h_n.append(h)
        c_n.append(c)
        if rnn.dropout and rnn.training and layer < rnn.num_layers - 1:
            layer_in = F.dropout(layer_in, rnn.dropout, True)
    out = layer_in if rnn.batch_first else layer_in.transpose(0, 1)
    hn = torch.cat(h_n)
    if kind == "lstm":
        return out, (hn, torch.cat(c_n))  # type: ignore[arg-type]
    return out, hn


class MaskedRNN(nn.Module):
    """Wraps an LSTM/GRU; applies the masks of its layers' groups inside the recurrence."""

    def __init__(self, rnn: nn.RNNBase, state: MaskState, groups: list[int | None]):
        super().__init__()
        self.rnn, self.state, self.groups = rnn, state, groups

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        masks = [self.state.masks[g] if g is not None else None for g in self.groups]
        if all(m is None for m in masks):
            return self.rnn(x, hx)
        if hx is not None:
            raise NotImplementedError("a masked RNN starts from a zero state; do not pass hx")
        return masked_rnn(self.rnn, x, masks)


LEAF_MODULES[Mask] = OpInfo("identity", "zero")
LEAF_MODULES[InputMask] = OpInfo("identity", "zero")
LEAF_MODULES[MaskedRNN] = OpInfo("rnn", "param")


def masked_model(structure: Structure) -> tuple[fx.GraphModule, MaskState]:
    """A deep copy of the traced model with masks inserted; weights are copied, not shared."""
    gm = copy.deepcopy(structure.graph_module)
    resolve = None
    if structure.inputs is not None:
        cm = cost_model(structure)
        resolve = functools.partial(effective_keep, cm)
    state = MaskState(len(structure.groups), resolve)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    if structure.inputs is not None:
        (x,) = [n for n in graph.nodes if n.op == "placeholder"]
        dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
        unit_of = torch.as_tensor(structure.inputs.unit_of, device=dev)
        gm.add_submodule("deepiot_input_mask", InputMask(state, unit_of))
        users = list(x.users)
        with graph.inserting_after(x):
            mask_node = graph.call_module("deepiot_input_mask", (x,))
        for u in users:
            u.replace_input_with(x, mask_node)
    for point, g in structure.mask_points.items():
        node = nodes[point]
        name = f"deepiot_mask_{g}"
        gm.add_submodule(name, Mask(state, g, structure.mask_axis[g], structure.mask_ndim[g]))
        users = list(node.users)
        with graph.inserting_after(node):
            mask_node = graph.call_module(name, (node,))
        for u in users:
            u.replace_input_with(node, mask_node)
    for lay in structure.layers:
        if lay.kind in ("lstm", "gru") and any(g is not None for g in lay.groups):
            parent_name, _, leaf = lay.module.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            setattr(parent, leaf, MaskedRNN(getattr(parent, leaf), state, lay.groups))
    graph.lint()
    gm.recompile()
    return gm, state


def rnn_of(gm: nn.Module, module: str) -> nn.RNNBase:
    """The recurrent module at ``module``, unwrapping a MaskedRNN."""
    m = gm.get_submodule(module)
    return m.rnn if isinstance(m, MaskedRNN) else m  # type: ignore[return-value]
