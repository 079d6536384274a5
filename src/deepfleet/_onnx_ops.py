"""The per-op half of ``model.onnx`` (:mod:`deepfleet._onnx`): a node builder, and one converter
per op of the device runtime (:data:`CONVERTERS`: op name -> fn(builder, context, op, inputs,
output)), each writing the ONNX nodes that compute what the runtime's op computes.

Like :mod:`deepfleet._onnx` this module may not import torch; onnx is imported when a node is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepfleet.device_agent.format import decode_tensor, sparse_rows
from deepfleet.errors import ExportError

__all__ = ["CONVERTERS", "Builder", "Context", "qdq"]

_INT64_MAX, _INT64_MIN = 2**63 - 1, -(2**63)


@dataclass
class Builder:
    """The ONNX graph being written: nodes, initialisers (deduplicated by name), and the ONNX
    value standing for each artifact value (``alias``: a quantiser moved up renames it)."""

    nodes: list[Any] = field(default_factory=list)
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)  # artifact value -> ONNX value
    count: int = 0
    int8_weights: int = 0  # encoded weights kept as int8 codes
    decoded_weights: int = 0  # encoded weights decoded to float32

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        self.inits.setdefault(name, np.array(value, dtype=dtype, order="C"))  # 0-d stays 0-d
        return name

    def ints(self, values: list[int] | tuple[int, ...]) -> str:
        return self.const("i64[" + ",".join(map(str, values)) + "]", list(values), np.int64)

    def node(self, op: str, inputs: list[str], out: str | list[str] | None = None, **attrs: Any) -> str:
        """Append a node; return its (first) output, named ``out`` or a fresh name."""
        from onnx import helper

        self.count += 1
        outs = out if isinstance(out, list) else [out or f"_t{self.count}"]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"n{self.count}_{op}", **attrs))
        return outs[0]

    def ref(self, name: str) -> str:
        return self.alias.get(name, name)


@dataclass(frozen=True)
class Context:
    """What every converter may read: the artifact graph and arrays, value shapes, the values
    quantised to 8 bits, and which op outputs something reads."""

    graph: dict[str, Any]
    arrays: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]  # value -> shape at batch 2 (name@3: at batch 3)
    quantised: set[str]  # values quantised to 8 bits right after they are computed
    used: dict[str, set[str]]  # op name -> its outputs that something reads


def _weight(b: Builder, c: Context, ref: str) -> str:
    """The ONNX value of artifact weight ``ref``: an int8 initialiser through DequantizeLinear
    for 8-bit fixed-point codes, else the decoded float32 tensor."""
    spec = c.graph.get("tensors", {}).get(ref, {})
    codes = _int8_codes(spec, c.arrays)
    if codes is not None:
        b.int8_weights += 1
        q = b.const(ref + ".codes", codes.reshape(spec["shape"]), np.int8)
        scale = b.const(ref + ".scale", 2.0 ** -spec["frac_bits"])
        return b.node("DequantizeLinear", [q, scale, b.const("zero.int8", 0, np.int8)], ref)
    b.decoded_weights += spec.get("encoding", "float32") != "float32"
    return b.const(ref, decode_tensor(ref, spec, c.arrays))


def _int8_codes(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    if spec.get("encoding") != "fixed" or spec.get("packed"):
        return None
    codes = arrays[spec["codes"]]
    return codes if codes.dtype == np.int8 else None


# ---------------------------------------------------------------------------- op converters
# Each: (builder, context, op entry, ONNX names of the inputs, output name) -> None.


def _conv(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    a, w = op["attrs"], op["weights"]
    ins = [xs[0], _weight(b, c, w["weight"])] + ([_weight(b, c, w["bias"])] if "bias" in w else [])
    b.node("Conv", ins, out, strides=a["stride"], pads=list(a["padding"]) * 2,
           dilations=a["dilation"])


def _linear(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    w = op["weights"]
    shape = c.shapes[op["inputs"][0]]
    x = xs[0] if len(shape) == 2 else b.node("Reshape", [xs[0], b.ints([-1, shape[-1]])])
    # Gemm, not MatMul: onnxruntime turns a weight-only int8 MatMul into MatMulNBits, whose
    # result differs from the float product (by 1 % measured); Gemm keeps it exact. With int8
    # weights and a float output the bias is added after it: onnxruntime fuses a quantised-input
    # Gemm into QGemm with a float output only without a float bias (with a quantised output it
    # quantises the bias itself).
    codes = _int8_codes(c.graph.get("tensors", {}).get(w["weight"], {}), c.arrays)
    int8 = codes is not None and op["name"] not in c.quantised
    bias = _weight(b, c, w["bias"]) if "bias" in w else None
    y = b.node("Gemm", [x, _weight(b, c, w["weight"])] + ([bias] if bias and not int8 else []),
               out if len(shape) == 2 and not (bias and int8) else None, transB=1)
    if bias and int8:
        y = b.node("Add", [y, bias], out if len(shape) == 2 else None)
    if len(shape) != 2:
        _reshape_to(b, c, y, op["name"], out)


def _affine(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    shape = (1, -1) + (1,) * (len(c.shapes[op["inputs"][0]]) - 2)
    scale = decode_tensor(op["weights"]["scale"], c.graph["tensors"].get(op["weights"]["scale"], {}), c.arrays)
    shift = decode_tensor(op["weights"]["shift"], c.graph["tensors"].get(op["weights"]["shift"], {}), c.arrays)
    s = b.const(op["weights"]["scale"], scale.reshape(shape))
    t = b.const(op["weights"]["shift"], shift.reshape(shape))
    b.node("Add", [b.node("Mul", [xs[0], s]), t], out)


def _act(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    a, x = op["attrs"], xs[0]
    fn = a["fn"]
    simple = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}
    if fn in simple:
        b.node(simple[fn], [x], out)
    elif fn == "leaky_relu":
        b.node("LeakyRelu", [x], out, alpha=float(a["slope"]))
    elif fn == "elu":
        b.node("Elu", [x], out, alpha=float(a["alpha"]))
    elif fn == "hardtanh":
        b.node("Clip", [x, b.const(f"f32({a['min']})", a["min"]), b.const(f"f32({a['max']})", a["max"])], out)
    elif fn == "silu":
        b.node("Mul", [x, b.node("Sigmoid", [x])], out)
    elif fn == "gelu" and a.get("approximate") == "tanh":
        cube = b.node("Mul", [b.node("Mul", [x, x]), x])
        inner = b.node("Add", [x, b.node("Mul", [cube, b.const("f32(0.044715)", 0.044715)])])
        t = b.node("Tanh", [b.node("Mul", [inner, b.const("f32(sqrt(2/pi))", math.sqrt(2 / math.pi))])])
        half_x = b.node("Mul", [x, b.const("f32(0.5)", 0.5)])
        b.node("Mul", [half_x, b.node("Add", [t, b.const("f32(1)", 1.0)])], out)
    elif fn == "gelu":
        erf = b.node("Erf", [b.node("Mul", [x, b.const("f32(1/sqrt(2))", 1 / math.sqrt(2))])])
        half_x = b.node("Mul", [x, b.const("f32(0.5)", 0.5)])
        b.node("Mul", [half_x, b.node("Add", [erf, b.const("f32(1)", 1.0)])], out)
    elif fn in ("softmax", "log_softmax"):
        b.node("Softmax" if fn == "softmax" else "LogSoftmax", [x], out, axis=int(a["axis"]))
    elif fn == "sign":  # +1 for x >= 0, else -1
        ge = b.node("GreaterOrEqual", [x, b.const("f32(0)", 0.0)])
        b.node("Where", [ge, b.const("f32(1)", 1.0), b.const("f32(-1)", -1.0)], out)
    else:
        raise ExportError(f"activation {fn!r} (op {op['name']!r}) has no ONNX conversion")


def _pool_attrs(a: dict) -> dict[str, Any]:
    return {"kernel_shape": a["kernel"], "strides": a["stride"], "pads": list(a["padding"]) * 2,
            "ceil_mode": int(bool(a.get("ceil_mode")))}


def _max_pool(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    b.node("MaxPool", xs, out, dilations=a.get("dilation", [1] * len(a["kernel"])), **_pool_attrs(a))


def _avg_pool(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    b.node("AveragePool", xs, out, count_include_pad=int(op["attrs"].get("count_include_pad", True)),
           **_pool_attrs(op["attrs"]))


def _adaptive_pool(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    """Per spatial axis (a rectangle's mean or max is separable): the bins of torch's adaptive
    pooling (start floor(i n / o), end ceil((i + 1) n / o)), each sliced and reduced."""
    reduce = "ReduceMax" if op["attrs"]["mode"] == "max" else "ReduceMean"
    spatial = c.shapes[op["inputs"][0]][2:]
    x = xs[0]
    for axis, (n, o) in enumerate(zip(spatial, op["attrs"]["output_size"])):
        ax = axis + 2
        bins = [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)]
        parts = [b.node(reduce, [b.node("Slice", [x, b.ints([s]), b.ints([e]), b.ints([ax])])],
                        axes=[ax], keepdims=1) for s, e in bins]
        x = parts[0] if len(parts) == 1 else b.node("Concat", parts, axis=ax)
    b.node("Identity", [x], out)


def _reshape_to(b: Builder, c: Context, x: str, value: str, out: str) -> None:
    """Reshape ``x`` to the shape of artifact value ``value`` (-1 on its batch axis)."""
    s2, s3 = c.shapes[value], c.shapes[value + "@3"]
    dims = [d if d == e else -1 for d, e in zip(s2, s3)]
    if dims.count(-1) > 1:
        raise ExportError(f"op {value!r}: more than one axis grows with the batch; ONNX Reshape "
                          "can infer one")
    b.node("Reshape", [x, b.ints(dims)], out)


def _reshape(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    _reshape_to(b, c, xs[0], op["name"], out)


def _permute(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    b.node("Transpose", xs, out, perm=op["attrs"]["dims"])


def _getitem(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    """Python indexing: slices in one Slice, integer indices by Gather (last axis first), new
    axes (None) by one Unsqueeze at their output positions."""
    rank = len(c.shapes[op["inputs"][0]])
    items = op["attrs"]["index"]
    used = sum(1 for it in items if "slice" in it or "index" in it)
    expanded: list[dict] = []
    for it in items:
        expanded += [{"slice": [None, None, None]}] * (rank - used) if "ellipsis" in it else [it]
    starts, ends, axes, steps, gathers, news = [], [], [], [], [], []
    axis = out_pos = 0
    for it in expanded:
        if "none" in it:
            news.append(out_pos)
            out_pos += 1
        elif "index" in it:
            gathers.append((axis, int(it["index"])))
            axis += 1
        else:
            start, stop, step = it["slice"]
            step = 1 if step is None else int(step)
            if (start, stop, step) != (None, None, 1):
                starts.append(int(start) if start is not None else (0 if step > 0 else _INT64_MAX))
                ends.append(int(stop) if stop is not None else (_INT64_MAX if step > 0 else _INT64_MIN))
                axes.append(axis)
                steps.append(step)
            axis += 1
            out_pos += 1
    x = xs[0]
    if axes:
        x = b.node("Slice", [x, b.ints(starts), b.ints(ends), b.ints(axes), b.ints(steps)])
    for ax, index in sorted(gathers, reverse=True):
        x = b.node("Gather", [x, b.const(f"i64({index})", index, np.int64)], axis=ax)
    if news:
        x = b.node("Unsqueeze", [x, b.ints(news)])
    b.node("Identity", [x], out)


def _cat(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    b.node("Concat", xs, out, axis=op["attrs"]["axis"])


def _stack(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    ax = b.ints([op["attrs"]["axis"]])
    b.node("Concat", [b.node("Unsqueeze", [x, ax]) for x in xs], out, axis=op["attrs"]["axis"])


def _reduce(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    keep = int(bool(a["keepdim"]))
    if a["fn"] == "sum":  # opset 13+: axes as an input
        b.node("ReduceSum", [xs[0], b.ints(a["dims"])], out, keepdims=keep)
    else:  # opset 17: axes as an attribute
        b.node({"mean": "ReduceMean", "amax": "ReduceMax"}[a["fn"]], xs, out, axes=a["dims"], keepdims=keep)


def _squeeze(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    dims = op["attrs"]["dims"] or [i for i, d in enumerate(c.shapes[op["inputs"][0]]) if d == 1]
    b.node("Squeeze", [xs[0], b.ints(dims)], out)


def _unsqueeze(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    b.node("Unsqueeze", [xs[0], b.ints([op["attrs"]["dim"]])], out)


def _binary(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    left = xs[0] if a.get("left") is None else b.const(f"f32({a['left']})", a["left"])
    right = xs[-1] if a.get("right") is None else b.const(f"f32({a['right']})", a["right"])
    b.node({"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}[a["fn"]], [left, right], out)


# torch's gate blocks -> ONNX's: LSTM i,f,g,o -> i,o,f,c; GRU r,z,n -> z,r,h
_GATES = {"lstm": (4, [0, 3, 1, 2]), "gru": (3, [1, 0, 2])}


def _gates(a: np.ndarray, kind: str) -> np.ndarray:
    g, order = _GATES[kind]
    blocks = np.split(a, g, axis=0)
    return np.concatenate([blocks[i] for i in order])


def _rnn_weight(b: Builder, c: Context, op: dict, layer: int, role: str, D: int) -> str:
    """W or R of one layer, (D, G*H, in), gates in ONNX order; int8 codes through one
    DequantizeLinear (scale per direction) when every direction has them."""
    kind = op["attrs"]["kind"]
    refs = [op["weights"][f"l{layer}_d{d}_{role}"] for d in range(D)]
    specs = [c.graph.get("tensors", {}).get(r, {}) for r in refs]
    codes = [_int8_codes(s, c.arrays) for s in specs]
    name = f"{op['name']}.l{layer}_{role}"
    if all(q is not None for q in codes):
        b.int8_weights += D
        q = np.stack([_gates(q.reshape(s["shape"]), kind) for q, s in zip(codes, specs)])  # type: ignore[union-attr]
        scales = [2.0 ** -s["frac_bits"] for s in specs]
        qn = b.const(name + ".codes", q, np.int8)
        scale = b.const(name + ".scale", scales, np.float32)
        zero = b.const(f"zero.int8[{D}]", [0] * D, np.int8)
        return b.node("DequantizeLinear", [qn, scale, zero], name, axis=0)
    b.decoded_weights += sum(s.get("encoding", "float32") != "float32" for s in specs)
    return b.const(name, np.stack([_gates(decode_tensor(r, s, c.arrays), kind) for r, s in zip(refs, specs)]))


def _rnn_bias(c: Context, op: dict, layer: int, D: int, hidden: int) -> np.ndarray:
    """B of one layer, (D, 2*G*H): [b_ih, b_hh] per direction, zeros where torch has none."""
    kind, rows = op["attrs"]["kind"], []
    for d in range(D):
        parts = []
        for role in ("b_ih", "b_hh"):
            ref = op["weights"].get(f"l{layer}_d{d}_{role}")
            value = (np.zeros(_GATES[kind][0] * hidden, np.float32) if ref is None
                     else decode_tensor(ref, c.graph.get("tensors", {}).get(ref, {}), c.arrays))
            parts.append(_gates(value, kind))
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def _rnn(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    """Stacked (bi)LSTM/GRU as one ONNX LSTM/GRU per layer, time-major inside; only the
    outputs something reads (``name:0`` the sequence, ``name:1``... final h and c) are made."""
    a, kind, name = op["attrs"], op["attrs"]["kind"], op["name"]
    D, used, layers = 2 if a["bidirectional"] else 1, c.used.get(op["name"], set()), len(a["hidden"])
    x = b.node("Transpose", [xs[0]], perm=[1, 0, 2]) if a["batch_first"] else xs[0]  # (T, B, I)
    for layer, hidden in enumerate(a["hidden"]):
        W = _rnn_weight(b, c, op, layer, "w_ih", D)
        R = _rnn_weight(b, c, op, layer, "w_hh", D)
        B = b.const(f"{name}.l{layer}_b", _rnn_bias(c, op, layer, D, hidden))
        finals = [1 + 2 * (layer * D + d) for d in range(D)]  # output index of h; c follows it
        if kind == "gru" and any(f"{name}:{i + 1}" in used for i in finals):
            raise ExportError(f"op {name!r}: a GRU has no cell state to read")
        outs = [f"_{name}.l{layer}.{s}" for s in ("y", "h", "c")[: 3 if kind == "lstm" else 2]]
        attrs: dict[str, Any] = {"hidden_size": hidden, "direction": "bidirectional" if D == 2 else "forward"}
        if kind == "gru":
            attrs["linear_before_reset"] = 1  # torch applies the reset gate after W_hn h + b_hn
        b.node(kind.upper(), [x, W, R, B], outs, **attrs)
        for d, i in enumerate(finals):
            for k, state in zip((i, i + 1), outs[1:]):
                if f"{name}:{k}" in used:  # (D, B, H) -> (B, H) of direction d
                    b.node("Gather", [state, b.const(f"i64({d})", d, np.int64)], f"{name}:{k}", axis=0)
        if layer < layers - 1 or f"{name}:0" in used:
            y = b.node("Transpose", [outs[0]], perm=[0, 2, 1, 3])  # (T, D, B, H) -> (T, B, D, H)
            x = b.node("Reshape", [y, b.ints([0, 0, -1])])  # (T, B, D*H)
    if f"{name}:0" in used:
        b.node("Transpose", [x], f"{name}:0", perm=[1, 0, 2]) if a["batch_first"] else b.node("Identity", [x], f"{name}:0")


def qdq(b: Builder, x: str, a: dict, out: str | None = None) -> str:
    """QuantizeLinear + DequantizeLinear with the fixed-point <bits, frac_bits> of ``a``."""
    scale = b.const(f"scale(2^-{a['frac_bits']})", 2.0 ** -a["frac_bits"])
    zero = b.const("zero.int8", 0, np.int8) if a["signed"] else b.const("zero.uint8", 0, np.uint8)
    return b.node("DequantizeLinear", [b.node("QuantizeLinear", [x, scale, zero]), scale, zero], out)


def _fake_quant(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    if a["bits"] == 8:
        qdq(b, xs[0], a, out)
        return
    lo, hi = (-(2 ** (a["bits"] - 1)), 2 ** (a["bits"] - 1) - 1) if a["signed"] else (0, 2 ** a["bits"] - 1)
    scaled = b.node("Mul", [xs[0], b.const(f"f32(2^{a['frac_bits']})", 2.0 ** a["frac_bits"])])
    codes = b.node("Clip", [b.node("Round", [scaled]), b.const(f"f32({lo})", lo), b.const(f"f32({hi})", hi)])
    b.node("Mul", [codes, b.const(f"scale(2^-{a['frac_bits']})", 2.0 ** -a["frac_bits"])], out)


def _const(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    b.node("Identity", [_weight(b, c, op["weights"]["value"])], out)


def _gather(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    idx = b.const(f"{op['name']}.indices", np.asarray(a["indices"], dtype=np.int64), np.int64)
    b.node("Gather", [xs[0], idx], out, axis=int(a["axis"]))


def _sparse_linear(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    """The row-sparse product at the cost of the nonzeros, as the runtime computes it: Gather
    the inputs each output reads ((..., rows, m)), Mul by the values, ReduceSum the last axis."""
    w = op["weights"]
    spec = c.graph.get("tensors", {}).get(w["weight"], {})
    index, values = sparse_rows(w["weight"], spec, c.arrays)
    b.decoded_weights += spec.get("encoding", "float32") != "float32"
    picked = b.node("Gather", [xs[0], b.const(w["weight"] + ".index", index, np.int64)], axis=-1)
    prod = b.node("Mul", [picked, b.const(w["weight"] + ".values", values)])
    if "bias" not in w:
        b.node("ReduceSum", [prod, b.ints([-1])], out, keepdims=0)
        return
    b.node("Add", [b.node("ReduceSum", [prod, b.ints([-1])], keepdims=0), _weight(b, c, w["bias"])], out)


def _temperature(b: Builder, c: Context, op: dict, xs: list[str], out: str) -> None:
    value = float(op["attrs"]["value"])
    b.node("Div", [xs[0], b.const(f"f32({value!r})", value)], out)


#: One converter per op of the device runtime's ``OPS`` table (a test keeps them equal).
CONVERTERS = {
    "const": _const, "conv": _conv, "linear": _linear, "affine": _affine, "max_pool": _max_pool,
    "avg_pool": _avg_pool, "adaptive_pool": _adaptive_pool, "act": _act, "reshape": _reshape,
    "permute": _permute, "getitem": _getitem, "cat": _cat, "stack": _stack, "reduce": _reduce,
    "squeeze": _squeeze, "unsqueeze": _unsqueeze, "binary": _binary, "rnn": _rnn,
    "fake_quant": _fake_quant, "gather": _gather, "sparse_linear": _sparse_linear, "temperature": _temperature,
}
