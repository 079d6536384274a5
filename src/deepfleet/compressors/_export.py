"""Export a torch model to the artifact graph (``graph.json`` + weight arrays).

The graph lists the model's operations in topological order, each with its input value names,
attributes and weight names, in the vocabulary of the numpy runtime in ``device_agent/agent.py``
(which is the oracle this exporter is tested against). Shapes that depend on the batch size are
found by running the model at two batch sizes. BatchNorm is folded into the Linear/Conv before
it; dropout and identities disappear.

Weights are float32 unless a quantiser gave an :class:`Encoding` for the parameter (by its
name in the model): then the artifact stores the encoding's codes, and the exporter checks that
they decode to exactly the model's weights. BatchNorm is never folded into encoded weights
(that would change them); quantisers fold it in torch before quantising.

A Linear whose weight has a ``factored`` encoding (SparseSep: W = codes @ atoms) becomes two ops,
``linear`` with the atoms and ``sparse_linear`` with the sparse codes, so that the runtimes
compute at the factored cost. Parameters named in ``sparse`` (pruned by a sparsity method) are
stored in the ``sparse`` encoding (their nonzeros and relative indices, wrapping a quantiser's
elementwise codes) whenever that is smaller than the dense form.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from deepfleet.compressors._encoding import Encoding, sparse_encoding
from deepfleet.compressors._extract import StackedRNN, rnn_layers
from deepfleet.compressors._masked import rnn_weights
from deepfleet.compressors._ops import classify, describe, trace
from deepfleet.device_agent.format import GRAPH_FORMAT, GRAPH_VERSION
from deepfleet.errors import ModelError, UnsupportedLayerError

_B1, _B2 = 2, 3


@dataclass
class _Stack:
    """The stacked final states of an nn.LSTM/GRU: materialised only if used as a tensor."""

    names: list[str]


@dataclass
class Exported:
    graph: dict[str, Any]
    arrays: dict[str, np.ndarray]
    macs: int  # multiply-accumulates per sample
    params: int  # weights stored (after BatchNorm folding)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _norm_axis(d: int, rank: int) -> int:
    return d % rank


class _Exporter:
    def __init__(
        self, gm: fx.GraphModule, v1: dict[str, Any], v2: dict[str, Any], encodings: dict[str, Encoding]
    ):
        self.gm = gm
        self.encodings = encodings
        self.param_names = {id(p): n for n, p in gm.named_parameters()}
        self.sources: dict[str, str] = {}  # artifact weight name -> model parameter name
        self.modules = dict(gm.named_modules())
        self.v1, self.v2 = v1, v2
        self.ops: list[dict[str, Any]] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.env: dict[str, Any] = {}
        self.macs = 0
        self.parts: dict[str, Encoding] = {}  # artifact weight -> a part of a split encoding
        self.consumed: set[str] = set()  # parameters whose encoding was split into parts

    # -- helpers
    def weight(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        """Store a float32 weight; a model parameter's name is remembered for its encoding."""
        if isinstance(value, torch.Tensor):
            source = self.param_names.get(id(value))
            if source is not None:
                self.sources[name] = source
            value = _np(value)
        else:
            self.sources.pop(name, None)  # a derived value (folded BatchNorm) is plain float32
        self.arrays[name] = np.ascontiguousarray(value, dtype=np.float32)
        return name

    def emit(self, name: str, op: str, inputs: list[str], attrs: dict | None = None,
             weights: dict[str, str] | None = None, num_outputs: int = 1) -> str:
        entry: dict[str, Any] = {"name": name, "op": op, "inputs": inputs}
        if attrs:
            entry["attrs"] = attrs
        if weights:
            entry["weights"] = weights
        if num_outputs != 1:
            entry["num_outputs"] = num_outputs
        self.ops.append(entry)
        return name

    def tensor_ref(self, arg: Any, node: fx.Node) -> str:
        ref = self.env[arg.name] if isinstance(arg, fx.Node) else arg
        if isinstance(ref, _Stack):
            name = f"{arg.name}__stacked"
            if name not in {o["name"] for o in self.ops}:
                self.emit(name, "stack", list(ref.names), {"axis": 0})
            return name
        if not isinstance(ref, str):
            raise UnsupportedLayerError(
                f"operation {describe(node)} (node {node.name!r}) takes {type(ref).__name__} "
                "where the exporter expects a tensor"
            )
        return ref

    def shape_spec(self, name: str) -> list[Any]:
        """A node's output shape with batch-proportional dims written as {"batch": k}."""
        s1, s2 = tuple(self.v1[name].shape), tuple(self.v2[name].shape)
        return [a if a == b else {"batch": (b - a) // (_B2 - _B1)} for a, b in zip(s1, s2)]

    def batch_axis(self, name: str) -> tuple[int | None, int]:
        s1, s2 = tuple(self.v1[name].shape), tuple(self.v2[name].shape)
        for i, (a, b) in enumerate(zip(s1, s2)):
            if a != b:
                return i, (b - a) // (_B2 - _B1)
        return None, 1

    # -- the walk
    def run(self) -> tuple[list[str], str, list[int]]:
        outputs: list[str] = []
        input_name = ""
        input_shape: list[int] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if input_name:
                    raise UnsupportedLayerError("the model takes more than one input; export needs one")
                input_name = node.name
                input_shape = list(self.v1[node.name].shape[1:])
                self.env[node.name] = node.name
            elif node.op == "output":
                result = node.args[0]
                items = result if isinstance(result, (tuple, list)) else [result]
                outputs = [self.tensor_ref(r, node) for r in items]
            elif node.op == "get_attr":
                value = getattr(self.gm, str(node.target)) if "." not in str(node.target) else self.gm.get_parameter(str(node.target))
                w = self.weight(f"{node.name}.value", _np(value))
                self.env[node.name] = self.emit(node.name, "const", [], weights={"value": w})
            else:
                self.visit(node)
        return outputs, input_name, input_shape

    def visit(self, node: fx.Node) -> None:
        info = classify(node, self.modules)
        v = self.v1[node.name]
        if not isinstance(v, (torch.Tensor, tuple, list)):
            self.env[node.name] = v  # an int from .size(): shapes are taken from recorded values
            return
        kind = info.kind
        handler = getattr(self, f"op_{kind}", None)
        if handler is None:
            raise UnsupportedLayerError(
                f"operation {describe(node)} (node {node.name!r}, {kind}) cannot be exported to the "
                "device runtime"
            )
        handler(node)

    def _args(self, node: fx.Node) -> tuple[tuple, dict]:
        return node.args, dict(node.kwargs)

    # parametric layers
    def _factored_linear(self, node: fx.Node, mod: nn.Linear, enc: Encoding) -> None:
        """x @ atoms.T (``linear``), then the sparse codes (``sparse_linear``) with the bias."""
        atoms, codes = enc.parts["atoms"], enc.parts["codes"]
        a = self.weight(f"{node.name}.atoms", atoms.decode())
        c = self.weight(f"{node.name}.codes", codes.decode())
        self.parts.update({a: atoms, c: codes})
        self.consumed.add(self.param_names[id(mod.weight)])
        w = {"weight": c}
        if mod.bias is not None:
            w["bias"] = self.weight(f"{node.name}.bias", mod.bias)
        x = self.tensor_ref(node.args[0], node)
        positions = int(self.v1[node.name].numel() // _B1) // mod.out_features
        nonzero = int(codes.stored if codes.stored is not None else np.count_nonzero(self.arrays[c]))
        self.macs += positions * (atoms.shape[0] * mod.in_features + nonzero)
        z = self.emit(f"{node.name}__atoms", "linear", [x], weights={"weight": a})
        self.env[node.name] = self.emit(node.name, "sparse_linear", [z], weights=w)

    def op_linear(self, node: fx.Node) -> None:
        mod = self.modules[str(node.target)]
        enc = self.encodings.get(self.param_names.get(id(mod.weight), ""))
        if enc is not None and enc.kind == "factored":
            self._factored_linear(node, mod, enc)
            return
        w = {"weight": self.weight(f"{node.name}.weight", mod.weight)}
        if mod.bias is not None:
            w["bias"] = self.weight(f"{node.name}.bias", mod.bias)
        x = self.tensor_ref(node.args[0], node)
        out = self.v1[node.name]
        self.macs += int(out.numel() // _B1) * mod.in_features
        self.env[node.name] = self.emit(node.name, "linear", [x], weights=w)

    def _conv(self, node: fx.Node) -> None:
        mod = self.modules[str(node.target)]
        if mod.groups != 1 or mod.padding_mode != "zeros":
            raise UnsupportedLayerError(f"conv {node.target!r}: only groups=1 and zero padding export")
        nd = mod.weight.dim() - 2
        pad = mod.padding
        if isinstance(pad, str):
            pad = [0] * nd if pad == "valid" else [d * (k - 1) // 2 for d, k in zip(mod.dilation, mod.kernel_size)]
        w = {"weight": self.weight(f"{node.name}.weight", mod.weight)}
        if mod.bias is not None:
            w["bias"] = self.weight(f"{node.name}.bias", mod.bias)
        attrs = {"stride": list(mod.stride), "padding": list(pad), "dilation": list(mod.dilation)}
        out = self.v1[node.name]
        self.macs += int(out.numel() // _B1) * int(np.prod(mod.weight.shape[1:]))
        self.env[node.name] = self.emit(node.name, "conv", [self.tensor_ref(node.args[0], node)], attrs, w)

    op_conv1d = _conv
    op_conv2d = _conv

    def _rnn(self, node: fx.Node) -> None:
        mod = self.modules[str(node.target)]
        if len(node.args) > 1 or node.kwargs:
            raise UnsupportedLayerError(f"recurrent layer {node.target!r} is given an initial state; export needs zero state")
        layers = rnn_layers(mod)
        first = layers[0][0]
        kind = "lstm" if isinstance(first, nn.LSTM) else "gru"
        D = 2 if first.bidirectional else 1
        w: dict[str, str] = {}
        hidden = []
        seq = self.v1[node.name][0]
        T = seq.shape[1] if first.batch_first else seq.shape[0]
        for li, (rnn, lj) in enumerate(layers):
            hidden.append(rnn.hidden_size)
            for d in range(D):
                tensors = rnn_weights(rnn, lj, d)
                names = ("w_ih", "w_hh", "b_ih", "b_hh")
                for nm, t in zip(names, tensors):
                    w[f"l{li}_d{d}_{nm}"] = self.weight(f"{node.name}.l{li}_d{d}_{nm}", t)
                self.macs += T * int(tensors[0].numel() + tensors[1].numel())
        L = len(layers)
        attrs = {"kind": kind, "batch_first": first.batch_first, "bidirectional": D == 2, "hidden": hidden}
        n_out = 1 + 2 * L * D
        self.emit(node.name, "rnn", [self.tensor_ref(node.args[0], node)], attrs, w, num_outputs=n_out)
        h = [f"{node.name}:{1 + 2 * i}" for i in range(L * D)]
        c = [f"{node.name}:{2 + 2 * i}" for i in range(L * D)]
        if isinstance(mod, StackedRNN):
            state: Any = (h, c) if kind == "lstm" else h
        else:
            state = (_Stack(h), _Stack(c)) if kind == "lstm" else _Stack(h)
        self.env[node.name] = (f"{node.name}:0", state)

    op_lstm = _rnn
    op_gru = _rnn
    op_stacked_rnn = _rnn
    op_rnn = _rnn  # a MaskedRNN wrapper

    # per-channel
    def op_batchnorm(self, node: fx.Node) -> None:
        bn = self.modules[str(node.target)]
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        src = node.args[0]
        src_op = next((o for o in self.ops if o["name"] == self.env.get(src.name)), None) if isinstance(src, fx.Node) else None
        foldable = src_op is not None and src_op["op"] in ("conv", "linear") and len(src.users) == 1
        if foldable and self.sources.get(src_op["weights"]["weight"]) not in self.encodings:
            # Fold: W' = W * scale (per output channel), b' = b * scale + shift.
            wname = src_op["weights"]["weight"]
            W = self.arrays[wname]
            s = _np(scale)
            self.arrays[wname] = (W * s.reshape((-1,) + (1,) * (W.ndim - 1))).astype(np.float32)
            b = self.arrays.get(src_op["weights"].get("bias", ""), np.zeros_like(s))
            src_op["weights"]["bias"] = self.weight(f"{src_op['name']}.bias", b * s + _np(shift))
            self.env[node.name] = self.env[src.name]
            return
        w = {"scale": self.weight(f"{node.name}.scale", _np(scale)), "shift": self.weight(f"{node.name}.shift", _np(shift))}
        self.env[node.name] = self.emit(node.name, "affine", [self.tensor_ref(src, node)], weights=w)

    def _act(self, node: fx.Node, fn: str, **params: Any) -> None:
        x = self.tensor_ref(node.args[0], node)
        self.env[node.name] = self.emit(node.name, "act", [x], {"fn": fn, **params})

    def _param(self, node: fx.Node, name: str, pos: int, default: Any) -> Any:
        if node.op == "call_module":
            return getattr(self.modules[str(node.target)], name, default)
        if name in node.kwargs:
            return node.kwargs[name]
        return node.args[pos] if len(node.args) > pos else default

    def op_relu(self, node: fx.Node) -> None:
        self._act(node, "relu")

    def op_tanh(self, node: fx.Node) -> None:
        self._act(node, "tanh")

    def op_sigmoid(self, node: fx.Node) -> None:
        self._act(node, "sigmoid")

    def op_silu(self, node: fx.Node) -> None:
        self._act(node, "silu")

    def op_gelu(self, node: fx.Node) -> None:
        self._act(node, "gelu", approximate=self._param(node, "approximate", 99, "none"))

    def op_leaky_relu(self, node: fx.Node) -> None:
        self._act(node, "leaky_relu", slope=float(self._param(node, "negative_slope", 1, 0.01)))

    def op_elu(self, node: fx.Node) -> None:
        self._act(node, "elu", alpha=float(self._param(node, "alpha", 1, 1.0)))

    def op_relu6(self, node: fx.Node) -> None:
        self._act(node, "hardtanh", min=0.0, max=6.0)

    def op_hardtanh(self, node: fx.Node) -> None:
        self._act(node, "hardtanh", min=float(self._param(node, "min_val", 1, -1.0)),
                  max=float(self._param(node, "max_val", 2, 1.0)))

    def _softmax(self, node: fx.Node, fn: str) -> None:
        dim = self._param(node, "dim", 1, None)
        if dim is None:
            raise UnsupportedLayerError(f"{fn} at node {node.name!r} needs an explicit dim")
        rank = self.v1[node.name].dim()
        self._act(node, fn, axis=_norm_axis(int(dim), rank))

    def op_softmax(self, node: fx.Node) -> None:
        self._softmax(node, "softmax")

    def op_log_softmax(self, node: fx.Node) -> None:
        self._softmax(node, "log_softmax")

    def op_sign(self, node: fx.Node) -> None:
        self._act(node, "sign")

    def op_fake_quant(self, node: fx.Node) -> None:
        mod = self.modules[str(node.target)]
        x = self.tensor_ref(node.args[0], node)
        attrs = {"bits": int(mod.bits), "frac_bits": int(mod.frac_bits), "signed": bool(mod.signed)}
        self.env[node.name] = self.emit(node.name, "fake_quant", [x], attrs)

    def op_temperature(self, node: fx.Node) -> None:
        mod = self.modules[str(node.target)]
        x = self.tensor_ref(node.args[0], node)
        self.env[node.name] = self.emit(node.name, "temperature", [x], {"value": float(mod.value)})

    def op_identity(self, node: fx.Node) -> None:
        self.env[node.name] = self.env[node.args[0].name]  # type: ignore[union-attr]

    # pooling
    def _pool_attrs(self, node: fx.Node, nd: int, avg: bool) -> dict[str, Any]:
        def lst(v: Any) -> list[int]:
            return [int(v)] * nd if isinstance(v, int) else [int(x) for x in v]

        k = self._param(node, "kernel_size", 1, None)
        s = self._param(node, "stride", 2, None) or k
        p = self._param(node, "padding", 3, 0)
        attrs: dict[str, Any] = {"kernel": lst(k), "stride": lst(s), "padding": lst(p)}
        if avg:
            attrs["ceil_mode"] = bool(self._param(node, "ceil_mode", 4, False))
            attrs["count_include_pad"] = bool(self._param(node, "count_include_pad", 5, True))
            if self._param(node, "divisor_override", 6, None) is not None:
                raise UnsupportedLayerError(f"avg_pool at node {node.name!r}: divisor_override does not export")
        else:
            attrs["dilation"] = lst(self._param(node, "dilation", 4, 1))
            attrs["ceil_mode"] = bool(self._param(node, "ceil_mode", 5, False))
        return attrs

    def op_max_pool(self, node: fx.Node) -> None:
        nd = self.v1[node.name].dim() - 2
        x = self.tensor_ref(node.args[0], node)
        self.env[node.name] = self.emit(node.name, "max_pool", [x], self._pool_attrs(node, nd, False))

    def op_avg_pool(self, node: fx.Node) -> None:
        nd = self.v1[node.name].dim() - 2
        x = self.tensor_ref(node.args[0], node)
        self.env[node.name] = self.emit(node.name, "avg_pool", [x], self._pool_attrs(node, nd, True))

    def _adaptive(self, node: fx.Node, mode: str) -> None:
        out_shape = list(self.v1[node.name].shape[2:])
        x = self.tensor_ref(node.args[0], node)
        self.env[node.name] = self.emit(node.name, "adaptive_pool", [x], {"mode": mode, "output_size": out_shape})

    def op_adaptive_avg_pool(self, node: fx.Node) -> None:
        self._adaptive(node, "avg")

    def op_adaptive_max_pool(self, node: fx.Node) -> None:
        self._adaptive(node, "max")

    # structure
    def _reshape(self, node: fx.Node) -> None:
        x_node = node.args[0]
        x = self.tensor_ref(x_node, node)
        spec = self.shape_spec(node.name)
        axis, mult = self.batch_axis(x_node.name)  # type: ignore[union-attr]
        self.env[node.name] = self.emit(node.name, "reshape", [x], {"shape": spec, "in_axis": axis, "in_mult": mult})

    op_flatten = _reshape
    op_reshape = _reshape
    op_squeeze = _reshape
    op_unsqueeze = _reshape

    def op_permute(self, node: fx.Node) -> None:
        rank = self.v1[node.args[0].name].dim()  # type: ignore[union-attr]
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        perm = [_norm_axis(int(d), rank) for d in dims]
        self.env[node.name] = self.emit(node.name, "permute", [self.tensor_ref(node.args[0], node)], {"dims": perm})

    def op_transpose(self, node: fx.Node) -> None:
        rank = self.v1[node.args[0].name].dim()  # type: ignore[union-attr]
        a, b = (_norm_axis(int(d), rank) for d in node.args[1:3])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        self.env[node.name] = self.emit(node.name, "permute", [self.tensor_ref(node.args[0], node)], {"dims": perm})

    def op_getitem(self, node: fx.Node) -> None:
        src, index = node.args
        ref = self.env[src.name] if isinstance(src, fx.Node) else src
        if isinstance(ref, (tuple, list)) and isinstance(index, int):
            self.env[node.name] = ref[index]
            return
        if isinstance(ref, _Stack) and isinstance(index, int):
            self.env[node.name] = ref.names[index]
            return
        items = index if isinstance(index, tuple) else (index,)
        spec = []
        for it in items:
            if isinstance(it, slice):
                spec.append({"slice": [it.start, it.stop, it.step]})
            elif isinstance(it, int):
                spec.append({"index": it})
            elif it is None:
                spec.append({"none": True})
            elif it is Ellipsis:
                spec.append({"ellipsis": True})
            else:
                raise UnsupportedLayerError(f"indexing at node {node.name!r} with {it!r} does not export")
        self.env[node.name] = self.emit(node.name, "getitem", [self.tensor_ref(src, node)], {"index": spec})

    def _seq(self, node: fx.Node, op: str) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        rank = self.v1[node.name].dim()
        names = [self.tensor_ref(t, node) for t in tensors]  # type: ignore[union-attr]
        self.env[node.name] = self.emit(node.name, op, names, {"axis": _norm_axis(int(dim), rank)})

    def op_cat(self, node: fx.Node) -> None:
        self._seq(node, "cat")

    def op_stack(self, node: fx.Node) -> None:
        self._seq(node, "stack")

    def _reduce(self, node: fx.Node, fn: str) -> None:
        x_node = node.args[0]
        rank = self.v1[x_node.name].dim()  # type: ignore[union-attr]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        dims = list(range(rank)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
        attrs = {"fn": fn, "dims": [_norm_axis(int(d), rank) for d in dims], "keepdim": keep}
        self.env[node.name] = self.emit(node.name, "reduce", [self.tensor_ref(x_node, node)], attrs)

    def op_mean(self, node: fx.Node) -> None:
        self._reduce(node, "mean")

    def op_sum(self, node: fx.Node) -> None:
        self._reduce(node, "sum")

    def op_amax(self, node: fx.Node) -> None:
        self._reduce(node, "amax")

    def _binary(self, node: fx.Node, fn: str) -> None:
        a, b = node.args[:2]
        attrs: dict[str, Any] = {"fn": fn}
        inputs = []
        for side, arg in (("left", a), ("right", b)):
            if isinstance(arg, fx.Node) and isinstance(self.v1[arg.name], torch.Tensor):
                inputs.append(self.tensor_ref(arg, node))
            else:
                value = self.v1[arg.name] if isinstance(arg, fx.Node) else arg
                attrs[side] = float(value)
        self.env[node.name] = self.emit(node.name, "binary", inputs, attrs)

    def op_add(self, node: fx.Node) -> None:
        self._binary(node, "add")

    def op_sub(self, node: fx.Node) -> None:
        self._binary(node, "sub")

    def op_mul(self, node: fx.Node) -> None:
        self._binary(node, "mul")

    def op_div(self, node: fx.Node) -> None:
        self._binary(node, "div")

    def _split(self, node: fx.Node) -> None:
        outs = self.v1[node.name]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        rank = outs[0].dim()
        axis = _norm_axis(int(dim), rank)
        x = self.tensor_ref(node.args[0], node)
        refs, start = [], 0
        for i, part in enumerate(outs):
            stop = start + part.shape[axis]
            spec = [{"slice": [None, None, None]}] * axis + [{"slice": [start, stop, None]}]
            refs.append(self.emit(f"{node.name}__{i}", "getitem", [x], {"index": spec}))
            start = stop
        self.env[node.name] = tuple(refs)

    op_chunk = _split
    op_split = _split

    def op_gather(self, node: fx.Node) -> None:
        mod = self.modules[str(node.target)]
        rank = self.v1[node.name].dim()
        attrs = {"axis": _norm_axis(int(mod.axis), rank), "indices": [int(i) for i in mod.indices.tolist()]}
        self.env[node.name] = self.emit(node.name, "gather", [self.tensor_ref(node.args[0], node)], attrs)


def record_values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, Any]:
    """{node name: its value} for one run of ``gm`` on ``x`` (no gradients)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def sparse_or(enc: Encoding | None, value: np.ndarray) -> Encoding | None:
    """``enc`` (None: float32), or the sparse encoding of ``value`` around it when smaller."""
    wrapped = sparse_encoding(value, enc)
    dense = enc.nbytes if enc is not None else value.nbytes
    return wrapped if wrapped is not None and wrapped.nbytes < dense else enc


def _encode(
    ex: _Exporter, names: set[str], encodings: dict[str, Encoding], sparse: Collection[str] = ()
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ``tensors`` entries and npz arrays of the referenced weights, encoded where asked."""
    tensors: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(names):
        value = ex.arrays[name]
        source = ex.sources.get(name, "")
        enc = ex.parts.get(name) or encodings.get(source)
        if source in sparse:
            enc = sparse_or(enc, value)
        if enc is None or enc.kind == "float32":
            tensors[name] = {"encoding": "float32", "shape": list(value.shape)}
            arrays[name] = value
            continue
        decoded = enc.decode()
        if decoded.shape != value.shape or not np.array_equal(decoded, value):
            raise ModelError(
                f"weight {ex.sources.get(name, name)!r} differs from its {enc.kind} encoding (max |diff| "
                f"{float(np.abs(decoded.reshape(value.shape) - value).max()) if decoded.size == value.size else 'shape'}); "
                "the model was changed after quantisation: quantise it again"
            )
        tensors[name], enc_arrays = enc.spec(name)
        arrays.update(enc_arrays)
    return tensors, arrays


def export_graph(
    model: nn.Module, input_shape: tuple[int, ...], encodings: dict[str, Encoding] | None = None,
    *, sparse: Collection[str] = (),
) -> Exported:
    """Export ``model`` (eval mode) for samples of ``input_shape``; raise UnsupportedLayerError.

    ``encodings`` (parameter name -> Encoding, from a quantiser) store those weights encoded;
    each must decode to exactly the parameter's value (ModelError otherwise). Names that are
    not weights of an exported op raise ModelError too, so no encoding is silently dropped.
    ``sparse`` names parameters (pruned ones) to store as their nonzeros where that is smaller.
    """
    model = model.eval()
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    gen = torch.Generator().manual_seed(0)
    dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
    v1 = record_values(gm, torch.randn((_B1, *input_shape), generator=gen).to(dev))
    v2 = record_values(gm, torch.randn((_B2, *input_shape), generator=gen).to(dev))
    encodings = encodings or {}
    ex = _Exporter(gm, v1, v2, encodings)
    outputs, input_name, shape = ex.run()
    # Drop ops nobody reads (e.g. an RNN's unused final states never materialise anyway).
    used = {i.split(":")[0] for o in ex.ops for i in o["inputs"]} | {o.split(":")[0] for o in outputs}
    ops = [o for o in ex.ops if o["name"] in used]
    referenced = {r for o in ops for r in o.get("weights", {}).values()}
    exported = {ex.sources[r] for r in referenced if r in ex.sources} | ex.consumed
    missing = sorted(set(encodings) - exported)
    if missing:
        raise ModelError(f"encodings given for {missing}, which are not weights of the exported graph")
    tensors, arrays = _encode(ex, referenced, encodings, sparse)
    graph = {
        "format": GRAPH_FORMAT,
        "version": GRAPH_VERSION,
        "input": {"name": input_name, "shape": shape, "dtype": "float32"},
        "outputs": outputs,
        "ops": ops,
        "tensors": tensors,
    }
    params = int(sum(np.prod(t["shape"], dtype=np.int64) for t in tensors.values()))
    return Exported(graph, arrays, ex.macs, params)
