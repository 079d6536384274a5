"""Features of a model for the latency and energy predictor, from its artifact.

One function, :func:`artifact_features`, shared by compression (every
:class:`~deepfleet.candidate.Candidate` carries its features), the search's predictor, the
predictor benchmark and the report. From the ONNX graph (:func:`onnx_features`), per op kind
(conv, linear, recurrent, pooling, elementwise, shape, gather, quant, other), for one sample:

* ``<kind>_macs``: multiply-accumulates (conv, linear, recurrent; 0 elsewhere),
* ``<kind>_params``: weights the ops of that kind read (through a DequantizeLinear too),
* ``<kind>_act_kb``: kilobytes of the activations they write (float32),
* ``<kind>_ops``: how many ops of that kind the graph runs,

plus ``macs``, ``params``, ``act_kb`` and ``ops`` over all kinds. The ONNX graph is the one the
artifact ships (``model.onnx``): the same structure as ``graph.json``, with shapes from ONNX's
own shape inference at batch 1 (a measurement at batch B does B times the per-sample work; the
predictor scales by the row's batch).

:func:`artifact_features` adds what the agent's numpy runtime executes where that departs from
the graph's counts (:data:`LOOP_FEATURES`, from the runtime's own plan at batch 1): it steps
every layer of a recurrent stack (or both directions of a layer) in one loop, one matmul a step
by a block matrix of all their weights. That matmul's work grows with the square of the summed
hidden sizes, not with the sum of the squares the graph's MACs count, and each loop step costs
a fixed 8-10 numpy calls. On edison (numpy) the predictor missed compressed deepsense models
(2-layer GRU) by more than 10 % for 27 % of them without these features, 2 % with them
(benchmarks/predictor.py, 50 points). Runtimes that run the graph's ops one by one (onnxruntime)
price them at about nothing.

* ``recurrent_loop_macs``: multiply-accumulates of the recurrent loops' matmuls (zero blocks
  included) and of the input projections done before them,
* ``recurrent_loop_steps``: steps of those loops,
* ``recurrent_loop_elems``: elements the per-step numpy calls touch, summed over steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["KINDS", "LOOP_FEATURES", "QUANTITIES", "artifact_features", "complete", "onnx_features"]

KINDS = ("conv", "linear", "recurrent", "pooling", "elementwise", "shape", "gather", "quant", "other")
QUANTITIES = ("macs", "params", "act_kb", "ops")
_KIND = {
    **dict.fromkeys(("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"), "conv"),
    **dict.fromkeys(("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "QGemm"), "linear"),
    **dict.fromkeys(("LSTM", "GRU", "RNN"), "recurrent"),
    **dict.fromkeys(("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
                     "ReduceMax", "ReduceSum"), "pooling"),
    **dict.fromkeys(("Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Erf", "Clip", "Softmax", "LogSoftmax",
                     "Add", "Sub", "Mul", "Div", "Where", "Greater", "GreaterOrEqual", "Less", "Round",
                     "Neg", "Abs", "Sqrt", "Pow", "Exp", "Log", "Sign", "Max", "Min"), "elementwise"),
    **dict.fromkeys(("Reshape", "Transpose", "Concat", "Slice", "Squeeze", "Unsqueeze", "Identity",
                     "Flatten", "Expand", "Split"), "shape"),
    **dict.fromkeys(("Gather", "GatherElements"), "gather"),
    **dict.fromkeys(("QuantizeLinear", "DequantizeLinear"), "quant"),
}


LOOP_FEATURES = ("recurrent_loop_macs", "recurrent_loop_steps", "recurrent_loop_elems")


def artifact_features(files: Mapping[str, bytes]) -> dict[str, float]:
    """The features of an artifact's files ({name: bytes}): :func:`onnx_features` of its
    ``model.onnx`` and the numpy runtime's loop work (:data:`LOOP_FEATURES`); empty without a
    ``model.onnx`` (a graph no runtime but numpy's can run has nothing to compare with)."""
    import io
    import json

    import numpy as np

    from deepfleet.artifact import ONNX_FILE
    from deepfleet.device_agent.runtime import Model

    if ONNX_FILE not in files:
        return {}
    graph = json.loads(files["graph.json"])
    work = {"macs": 0, "steps": 0, "elems": 0}
    # only rnn ops loop: other models skip loading and compiling (a vgg took 128 ms, not 1 ms)
    if any(op["op"] == "rnn" for op in graph["ops"]):
        with np.load(io.BytesIO(files["weights.npz"]), allow_pickle=False) as npz:
            work = Model(graph, {k: npz[k] for k in npz.files}).recurrent_work(batch=1)
    return {**onnx_features(files[ONNX_FILE]), **{f"recurrent_loop_{k}": float(v) for k, v in work.items()}}


def complete(features: Mapping[str, float]) -> bool:
    """Whether ``features`` hold every feature :func:`artifact_features` gives: candidates
    recorded before the loop features existed (an earlier session's) lack them, and a
    predictor that read their absence as zero would price their recurrent loops at nothing."""
    return bool(features) and all(k in features for k in LOOP_FEATURES)


def _size(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def onnx_features(data: bytes) -> dict[str, float]:
    """The features of the ONNX model ``data`` (see the module docstring); plain floats."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load_from_string(data)
    for value in model.graph.input:  # batch 1: symbolic dimensions become 1
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param or not d.dim_value:
                d.dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    numeric = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    weights = {t.name: list(numpy_helper.to_array(t).shape) for t in model.graph.initializer
               if t.data_type in numeric}  # not the int64 shapes and indices ops take
    # a weight read through DequantizeLinear counts as the initializer behind it
    through = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in weights}
    out = {f"{k}_{q}": 0.0 for k in KINDS for q in QUANTITIES}
    for node in model.graph.node:
        kind = _KIND.get(node.op_type, "other")
        read = [through.get(i, i) for i in node.input if through.get(i, i) in weights]
        params = 0 if kind == "quant" else sum(_size(weights[w]) for w in read)
        outs = [shapes.get(o, []) for o in node.output if o]
        out[f"{kind}_macs"] += _macs(node.op_type, [weights.get(w) for w in read], shapes, node, outs)
        out[f"{kind}_params"] += params
        out[f"{kind}_act_kb"] += sum(4 * _size(s) for s in outs if s) / 1024
        out[f"{kind}_ops"] += 1
    for q in QUANTITIES:
        out[q] = sum(out[f"{k}_{q}"] for k in KINDS)
    return out


def _macs(op: str, read: list[list[int] | None], shapes: Mapping[str, list[int]], node: object,
          outs: list[list[int]]) -> float:
    """Multiply-accumulates of one node for one sample (0 for ops without them)."""
    w = next((s for s in read if s is not None and len(s) >= 2), None)
    if w is None or not outs or not outs[0]:
        return 0.0
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        return float(_size(outs[0]) * _size(w[1:]))  # each output: C_in/groups x kernel
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "QGemm"):
        return float(_size(outs[0]) * (w[1] if op == "Gemm" and _trans_b(node) else w[0]))
    if op in ("LSTM", "GRU", "RNN"):
        x = shapes.get(node.input[0], [])  # type: ignore[attr-defined]
        steps = x[0] if x else 1
        recurrent = next((s for s in read[1:] if s is not None), [0, 0, 0])
        return float(steps * (_size(w) + _size(recurrent)))  # (dirs x gates*H) x (I + H) per step
    return 0.0


def _trans_b(node: object) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)  # type: ignore[attr-defined]
