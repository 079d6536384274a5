"""``model.onnx``: the artifact graph converted to ONNX, and the check that onnxruntime agrees.

The converter reads exactly what the device runtime reads (``graph.json`` ops and the
``weights.npz`` arrays), never a torch model, so the ONNX file is the graph the devices run,
built without tracing, with deterministic bytes (same graph and arrays -> same file). One
converter per op of the runtime's ``OPS`` table (:data:`CONVERTERS`, in :mod:`deepfleet._onnx_ops`);
opset :data:`OPSET`.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepfleet._onnx_ops import CONVERTERS, Builder, Context, qdq
from deepfleet.device_agent.runtime import Model
from deepfleet.errors import ExportError

OPSET = 17  # onnxruntime >= 1.13 runs it: old enough for the boards' packaged runtimes
IR_VERSION = 8  # the IR version of opset 17
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
    ctx = Context(graph, arrays, _value_shapes(graph, arrays), quantised, used)
    b = Builder()
    for op in graph["ops"]:
        if op["name"] in alias:  # an 8-bit quantiser moved up to the layer before it
            b.alias[op["name"]] = b.ref(alias[op["name"]])
            continue
        fn = CONVERTERS.get(op["op"])
        if fn is None:
            raise ExportError(f"op {op['name']!r} ({op['op']}) has no ONNX conversion")
        xs = [b.ref(i) for i in op["inputs"]]
        xs = [qdq(b, x, start[(op["name"], k)]) if (op["name"], k) in start else x for k, x in enumerate(xs)]
        out = op["name"] if op["name"] not in requant else f"_{op['name']}.float"
        fn(b, ctx, op, xs, out)
        if op["name"] in requant:
            qdq(b, out, requant[op["name"]], op["name"])
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
