"""``model.onnx``: the artifact graph converted to ONNX, and the check that onnxruntime agrees.

The converter reads exactly what the device runtime reads (``graph.json`` ops and the
``weights.npz`` arrays), never a torch model, so the ONNX file is the graph the devices run,
built without tracing, with deterministic bytes (same graph and arrays -> same file). One
converter per op of the runtime's ``OPS`` table (:data:`CONVERTERS`); opset :data:`OPSET`.

Weights are float32 (encoded ones decoded by the runtime's ``decode_tensor``) except fixed-point
tensors stored as 8-bit codes (``fixed``, int8, not bit-packed): those become int8 initialisers
read through ``DequantizeLinear`` (scale 2^-frac_bits, zero point 0), the exact values. An 8-bit
``fake_quant`` becomes ``QuantizeLinear``/``DequantizeLinear`` (int8, or uint8 when unsigned;
the same round-half-to-even and saturation). So that onnxruntime can fuse integer kernels
(QLinearConv, QGemm), such a quantiser is moved up to the output of the layer before it through
ops that commute with it (relu, max pooling, reshapes), with a Q/DQ pair after each: exact,
because quantisation is monotone, idempotent and maps 0 to 0. Fake quantisers of other widths
become Mul/Round/Clip/Mul in float.

This module may not import torch (the driver and the orchestrator import it); onnx and
onnxruntime are imported when a function needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepfleet.device_agent.format import decode_tensor, sparse_rows
from deepfleet.device_agent.runtime import Model
from deepfleet.errors import ExportError

OPSET = 17  # onnxruntime >= 1.13 runs it: old enough for the boards' packaged runtimes
IR_VERSION = 8  # the IR version of opset 17
_INT64_MAX, _INT64_MIN = 2**63 - 1, -(2**63)
# Ops through which an 8-bit quantiser moves up exactly: q(f(x)) = f(q(x)) for these f.
_COMMUTING = {"max_pool", "reshape", "permute", "getitem", "squeeze", "unsqueeze", "cat", "stack",
              "gather"}
TOLERANCE_FLOAT = 1e-4  # max |onnxruntime - reference| / max |reference|, float graphs
# Integer kernels requantise with a float multiplier and an int32 bias: a value on a rounding
# boundary lands one step away, and such steps travel to the outputs, through a recurrence too
# (measured on the trained zoo at 8/8 bits, test split: 0.1-1.3 %, 2.7 % for DeepIoT +
# fixed-point DeepSense). A converter bug (a wrong gate order, a wrong op) is tens of percent.
TOLERANCE_QDQ = 0.1


@dataclass(frozen=True)
class OnnxModel:
    """A converted graph: ``data`` (the file's bytes) and ``info`` for the manifest
    (opset, what the weights and the activations are)."""

    data: bytes
    info: dict[str, Any]

    @property
    def integer(self) -> bool:
        """Whether activations are quantised (onnxruntime may run integer kernels)."""
        return "int8 QDQ" in self.info["activations"]

    @property
    def tolerance(self) -> float:
        return TOLERANCE_QDQ if self.integer else TOLERANCE_FLOAT


@dataclass
class _Builder:
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
class _Ctx:
    graph: dict[str, Any]
    arrays: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]  # value -> shape at batch 2 (name@3: at batch 3)
    quantised: set[str]  # values quantised to 8 bits right after they are computed
    used: dict[str, set[str]]  # op name -> its outputs that something reads


def _weight(b: _Builder, c: _Ctx, ref: str) -> str:
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


def _conv(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    a, w = op["attrs"], op["weights"]
    ins = [xs[0], _weight(b, c, w["weight"])] + ([_weight(b, c, w["bias"])] if "bias" in w else [])
    b.node("Conv", ins, out, strides=a["stride"], pads=list(a["padding"]) * 2,
           dilations=a["dilation"])


def _linear(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


def _affine(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    shape = (1, -1) + (1,) * (len(c.shapes[op["inputs"][0]]) - 2)
    scale = decode_tensor(op["weights"]["scale"], c.graph["tensors"].get(op["weights"]["scale"], {}), c.arrays)
    shift = decode_tensor(op["weights"]["shift"], c.graph["tensors"].get(op["weights"]["shift"], {}), c.arrays)
    s = b.const(op["weights"]["scale"], scale.reshape(shape))
    t = b.const(op["weights"]["shift"], shift.reshape(shape))
    b.node("Add", [b.node("Mul", [xs[0], s]), t], out)


def _act(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


def _max_pool(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    b.node("MaxPool", xs, out, dilations=a.get("dilation", [1] * len(a["kernel"])), **_pool_attrs(a))


def _avg_pool(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    b.node("AveragePool", xs, out, count_include_pad=int(op["attrs"].get("count_include_pad", True)),
           **_pool_attrs(op["attrs"]))


def _adaptive_pool(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


def _reshape_to(b: _Builder, c: _Ctx, x: str, value: str, out: str) -> None:
    """Reshape ``x`` to the shape of artifact value ``value`` (-1 on its batch axis)."""
    s2, s3 = c.shapes[value], c.shapes[value + "@3"]
    dims = [d if d == e else -1 for d, e in zip(s2, s3)]
    if dims.count(-1) > 1:
        raise ExportError(f"op {value!r}: more than one axis grows with the batch; ONNX Reshape "
                          "can infer one")
    b.node("Reshape", [x, b.ints(dims)], out)


def _reshape(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    _reshape_to(b, c, xs[0], op["name"], out)


def _permute(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    b.node("Transpose", xs, out, perm=op["attrs"]["dims"])


def _getitem(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


def _cat(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    b.node("Concat", xs, out, axis=op["attrs"]["axis"])


def _stack(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    ax = b.ints([op["attrs"]["axis"]])
    b.node("Concat", [b.node("Unsqueeze", [x, ax]) for x in xs], out, axis=op["attrs"]["axis"])


def _reduce(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    keep = int(bool(a["keepdim"]))
    if a["fn"] == "sum":  # opset 13+: axes as an input
        b.node("ReduceSum", [xs[0], b.ints(a["dims"])], out, keepdims=keep)
    else:  # opset 17: axes as an attribute
        b.node({"mean": "ReduceMean", "amax": "ReduceMax"}[a["fn"]], xs, out, axes=a["dims"], keepdims=keep)


def _squeeze(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    dims = op["attrs"]["dims"] or [i for i, d in enumerate(c.shapes[op["inputs"][0]]) if d == 1]
    b.node("Squeeze", [xs[0], b.ints(dims)], out)


def _unsqueeze(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    b.node("Unsqueeze", [xs[0], b.ints([op["attrs"]["dim"]])], out)


def _binary(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


def _rnn_weight(b: _Builder, c: _Ctx, op: dict, layer: int, role: str, D: int) -> str:
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


def _rnn_bias(c: _Ctx, op: dict, layer: int, D: int, hidden: int) -> np.ndarray:
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


def _rnn(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


def _qdq(b: _Builder, x: str, a: dict, out: str | None = None) -> str:
    """QuantizeLinear + DequantizeLinear with the fixed-point <bits, frac_bits> of ``a``."""
    scale = b.const(f"scale(2^-{a['frac_bits']})", 2.0 ** -a["frac_bits"])
    zero = b.const("zero.int8", 0, np.int8) if a["signed"] else b.const("zero.uint8", 0, np.uint8)
    return b.node("DequantizeLinear", [b.node("QuantizeLinear", [x, scale, zero]), scale, zero], out)


def _fake_quant(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    if a["bits"] == 8:
        _qdq(b, xs[0], a, out)
        return
    lo, hi = (-(2 ** (a["bits"] - 1)), 2 ** (a["bits"] - 1) - 1) if a["signed"] else (0, 2 ** a["bits"] - 1)
    scaled = b.node("Mul", [xs[0], b.const(f"f32(2^{a['frac_bits']})", 2.0 ** a["frac_bits"])])
    codes = b.node("Clip", [b.node("Round", [scaled]), b.const(f"f32({lo})", lo), b.const(f"f32({hi})", hi)])
    b.node("Mul", [codes, b.const(f"scale(2^-{a['frac_bits']})", 2.0 ** -a["frac_bits"])], out)


def _const(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    b.node("Identity", [_weight(b, c, op["weights"]["value"])], out)


def _gather(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
    a = op["attrs"]
    idx = b.const(f"{op['name']}.indices", np.asarray(a["indices"], dtype=np.int64), np.int64)
    b.node("Gather", [xs[0], idx], out, axis=int(a["axis"]))


def _sparse_linear(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


def _temperature(b: _Builder, c: _Ctx, op: dict, xs: list[str], out: str) -> None:
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


# ---------------------------------------------------------------------------- the graph


def _value_shapes(graph: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of every value at batch 2 (``name``) and 3 (``name@3``), from the runtime."""
    model = Model(graph, arrays)
    shapes: dict[str, tuple[int, ...]] = {}
    for batch, suffix in ((2, ""), (3, "@3")):
        env = {model.input_name: np.zeros((batch, *model.input_shape), np.float32)}
        for fn, ins, attrs, weights, names in model.steps:
            out = fn([env[i] for i in ins], attrs, weights)
            env.update(zip(names, (out,) if len(names) == 1 else out))
        shapes.update({k + suffix: tuple(np.shape(v)) for k, v in env.items()})
    return shapes


def _commutes(op: dict) -> bool:
    return op["op"] in _COMMUTING or (op["op"] == "act" and op["attrs"]["fn"] == "relu")


def _qdq_plan(graph: dict[str, Any]) -> tuple[dict[tuple[str, int], dict], dict[str, dict], dict[str, str]]:
    """Where 8-bit quantisers go, moved up through the ops that commute with them:
    {(op, input position): attrs} inputs to quantise, {op: attrs} ops whose output is
    re-quantised, {quantiser op: the value it becomes}."""
    uses: dict[str, int] = {}
    for op in graph["ops"]:
        for i in op["inputs"]:
            uses[i] = uses.get(i, 0) + 1
    for o in graph["outputs"]:
        uses[o] = uses.get(o, 0) + 2  # never move past a graph output
    producer = {op["name"]: op for op in graph["ops"] if op.get("num_outputs", 1) == 1}
    start: dict[tuple[str, int], dict] = {}
    requant: dict[str, dict] = {}

    def movable(v: str) -> bool:  # only this chain reads v, and its op commutes
        return uses.get(v) == 1 and v in producer and _commutes(producer[v])

    def walk(v: str, consumer: str, pos: int, attrs: dict) -> None:
        if not movable(v):
            start[(consumer, pos)] = attrs
            return
        requant[v] = attrs
        for k, i in enumerate(producer[v]["inputs"]):
            walk(i, v, k, attrs)

    alias = {}
    for op in graph["ops"]:
        if op["op"] == "fake_quant" and op["attrs"]["bits"] == 8 and movable(op["inputs"][0]):
            walk(op["inputs"][0], op["name"], 0, op["attrs"])
            alias[op["name"]] = op["inputs"][0]
    return start, requant, alias


def to_onnx(graph: dict[str, Any], arrays: dict[str, np.ndarray]) -> OnnxModel:
    """Convert an artifact graph (graph.json as a dict, weights.npz's arrays) to ONNX.

    Deterministic: the same graph and arrays give the same bytes. Raises ExportError for a
    graph that cannot be converted (no input, an op without converter).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if "input" not in graph or not graph.get("outputs"):
        raise ExportError("the graph has no input or no outputs: nothing to convert to ONNX")
    used: dict[str, set[str]] = {}
    for op in graph["ops"]:
        for i in op["inputs"]:
            used.setdefault(i.split(":")[0], set()).add(i)
    for o in graph["outputs"]:
        used.setdefault(o.split(":")[0], set()).add(o)
    start, requant, alias = _qdq_plan(graph)
    ops = {op["name"]: op for op in graph["ops"]}
    quantised = set(requant) | {ops[name]["inputs"][k] for name, k in start}
    ctx = _Ctx(graph, arrays, _value_shapes(graph, arrays), quantised, used)
    b = _Builder()
    for op in graph["ops"]:
        if op["name"] in alias:  # an 8-bit quantiser moved up to the layer before it
            b.alias[op["name"]] = b.ref(alias[op["name"]])
            continue
        fn = CONVERTERS.get(op["op"])
        if fn is None:
            raise ExportError(f"op {op['name']!r} ({op['op']}) has no ONNX conversion")
        xs = [b.ref(i) for i in op["inputs"]]
        xs = [_qdq(b, x, start[(op["name"], k)]) if (op["name"], k) in start else x for k, x in enumerate(xs)]
        out = op["name"] if op["name"] not in requant else f"_{op['name']}.float"
        fn(b, ctx, op, xs, out)
        if op["name"] in requant:
            _qdq(b, out, requant[op["name"]], op["name"])
    outputs = []
    for i, o in enumerate(graph["outputs"]):
        name = o
        if b.ref(o) != o or o == graph["input"]["name"]:  # a moved quantiser, or the input itself
            name = b.node("Identity", [b.ref(o)], o if o != graph["input"]["name"] else f"output{i}")
        shape2, shape3 = ctx.shapes[o], ctx.shapes[o + "@3"]
        dims = [d if d == e else ("batch" if e - d == 1 else None) for d, e in zip(shape2, shape3)]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    inp = graph["input"]
    g = helper.make_graph(
        b.nodes, "deepfleet",
        [helper.make_tensor_value_info(inp["name"], TensorProto.FLOAT, ["batch", *inp["shape"]])],
        outputs, [numpy_helper.from_array(v, k) for k, v in b.inits.items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="deepfleet",
                              doc_string=f"deepfleet-graph v{graph['version']} converted to ONNX")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    fq = [op["attrs"]["bits"] for op in graph["ops"] if op["op"] == "fake_quant"]
    weights = ("int8 QDQ + decoded float32" if b.int8_weights and b.decoded_weights else "int8 QDQ"
               if b.int8_weights else "decoded float32" if b.decoded_weights else "float32")
    acts = ("float32" if not fq else "int8 QDQ" if all(bits == 8 for bits in fq)
            else "fixed point as float ops" if not any(bits == 8 for bits in fq)
            else "int8 QDQ + fixed point as float ops")
    return OnnxModel(model.SerializeToString(), {"opset": OPSET, "weights": weights, "activations": acts})


# ---------------------------------------------------------------------------- running and checking


def session(data: bytes, *, optimized: str | None = None) -> Any:
    """An onnxruntime CPU session (one thread, warnings off); ``optimized``: a path where
    onnxruntime writes the graph it actually runs (after its fusions)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_onnx(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    """The model's outputs on the float32 batch ``x``."""
    s = session(data)
    return s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    if out.shape != ref.shape:
        return math.inf
    return float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30)) if ref.size else 0.0


def _first_divergence(model: OnnxModel, graph: dict[str, Any], arrays: dict[str, np.ndarray],
                      x: np.ndarray) -> str:
    """Name the first op whose value differs between onnxruntime and the numpy runtime."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load_from_string(model.data)
    produced = {o for n in proto.graph.node for o in n.output}
    names = [n for op in graph["ops"] for n in ([op["name"]] if op.get("num_outputs", 1) == 1 else
             [f"{op['name']}:{i}" for i in range(op["num_outputs"])]) if n in produced]
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    s = session(proto.SerializeToString())
    got = dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: x})))
    rt = Model(graph, arrays)
    env = {rt.input_name: x}
    for fn, ins, attrs, weights, outs in rt.steps:
        out = fn([env[i] for i in ins], attrs, weights)
        env.update(zip(outs, (out,) if len(outs) == 1 else out))
    ops = {n: op for op in graph["ops"] for n in [op["name"]] + [f"{op['name']}:{i}" for i in range(op.get("num_outputs", 1))]}
    for n in names:
        err = _rel_err(np.asarray(got[n]), np.asarray(env[n], dtype=np.float32))
        if err > model.tolerance:
            return f"op {n!r} ({ops[n]['op']}) is the first to differ from the numpy runtime ({err:.2e})"
    return "no single op differs from the numpy runtime beyond the tolerance"


def check_onnx(model: OnnxModel, graph: dict[str, Any], arrays: dict[str, np.ndarray], x: np.ndarray,
               expected: list[np.ndarray], *, against: str = "torch") -> float:
    """onnxruntime's outputs on ``x`` against ``expected`` (the model's own outputs): return
    max |onnxruntime - expected| / max |expected| over the outputs, or raise ExportError when
    that exceeds ``model.tolerance``, naming the error and the first op that differs."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = run_onnx(model.data, x)
    err = max(_rel_err(np.asarray(o), np.asarray(e, dtype=np.float32)) for o, e in zip(outs, expected, strict=True))
    if err > model.tolerance:
        where = _first_divergence(model, graph, arrays, x)
        raise ExportError(
            f"model.onnx differs from {against}: max |onnxruntime - {against}| is {err:.3g} of the "
            f"largest output, but must stay within {model.tolerance:g} ({model.info['weights']} "
            f"weights, {model.info['activations']} activations); {where}"
        )
    return err


def export_onnx(graph: dict[str, Any], arrays: dict[str, np.ndarray], *, x: np.ndarray | None = None,
                expected: list[np.ndarray] | None = None, against: str = "the numpy runtime") -> OnnxModel:
    """Convert and check: onnxruntime must reproduce ``expected`` (the outputs of the model
    the graph was exported from, on ``x``); without them, the numpy runtime's outputs on a
    fixed standard-normal batch of 4. Raises ExportError (see :func:`check_onnx`)."""
    model = to_onnx(graph, arrays)
    if x is None:
        shape = (4, *graph["input"]["shape"])
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if expected is None:
        out = Model(graph, arrays).run(x)
        expected = list(out) if isinstance(out, tuple) else [out]
    check_onnx(model, graph, arrays, x, expected, against=against)
    return model
