"""The table of supported operations: what every node of a traced model is.

One table serves structure analysis (which units can be pruned, what they feed) and export to
the artifact format, so that a model the compressor accepts is a model the exporter can write.

Categories, by what an operation does to a pruned (all-zero) channel:

* ``param``   a layer with prunable units (Linear, Conv1d/2d, LSTM, GRU);
* ``zero``    elementwise, maps 0 to 0 (ReLU, tanh, dropout, ...): a mask commutes with it;
* ``pool``    pools within a channel (max/avg, adaptive): a mask commutes with it;
* ``norm``    per-channel affine (BatchNorm): must sit *before* the mask (0 -> beta);
* ``struct``  moves or reduces values without mixing channels (flatten, cat, slicing, mean ...);
* ``value``   anything else we can run (sigmoid, softmax, add, ...): it may not see pruned units.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from deepfleet.errors import UnsupportedLayerError

PARAM_MODULES: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.LSTM: "lstm",
    nn.GRU: "gru",
}

_MODULES: dict[type, tuple[str, str]] = {
    nn.BatchNorm1d: ("batchnorm", "norm"),
    nn.BatchNorm2d: ("batchnorm", "norm"),
    nn.ReLU: ("relu", "zero"),
    nn.ReLU6: ("relu6", "zero"),
    nn.LeakyReLU: ("leaky_relu", "zero"),
    nn.ELU: ("elu", "zero"),
    nn.Tanh: ("tanh", "zero"),
    nn.Hardtanh: ("hardtanh", "zero"),
    nn.GELU: ("gelu", "zero"),
    nn.SiLU: ("silu", "zero"),
    nn.Sigmoid: ("sigmoid", "value"),
    nn.Softmax: ("softmax", "value"),
    nn.LogSoftmax: ("log_softmax", "value"),
    nn.Dropout: ("identity", "zero"),
    nn.Dropout1d: ("identity", "zero"),
    nn.Dropout2d: ("identity", "zero"),
    nn.Identity: ("identity", "zero"),
    nn.MaxPool1d: ("max_pool", "pool"),
    nn.MaxPool2d: ("max_pool", "pool"),
    nn.AvgPool1d: ("avg_pool", "pool"),
    nn.AvgPool2d: ("avg_pool", "pool"),
    nn.AdaptiveAvgPool1d: ("adaptive_avg_pool", "pool"),
    nn.AdaptiveAvgPool2d: ("adaptive_avg_pool", "pool"),
    nn.AdaptiveMaxPool1d: ("adaptive_max_pool", "pool"),
    nn.AdaptiveMaxPool2d: ("adaptive_max_pool", "pool"),
    nn.Flatten: ("flatten", "struct"),
}

_FUNCTIONS: dict[object, tuple[str, str]] = {
    torch.relu: ("relu", "zero"),
    F.relu: ("relu", "zero"),
    F.relu6: ("relu6", "zero"),
    F.leaky_relu: ("leaky_relu", "zero"),
    F.elu: ("elu", "zero"),
    torch.tanh: ("tanh", "zero"),
    F.tanh: ("tanh", "zero"),
    F.hardtanh: ("hardtanh", "zero"),
    F.gelu: ("gelu", "zero"),
    F.silu: ("silu", "zero"),
    torch.sigmoid: ("sigmoid", "value"),
    F.sigmoid: ("sigmoid", "value"),
    F.softmax: ("softmax", "value"),
    torch.softmax: ("softmax", "value"),
    F.log_softmax: ("log_softmax", "value"),
    torch.log_softmax: ("log_softmax", "value"),
    F.dropout: ("identity", "zero"),
    F.max_pool1d: ("max_pool", "pool"),
    F.max_pool2d: ("max_pool", "pool"),
    F.avg_pool1d: ("avg_pool", "pool"),
    F.avg_pool2d: ("avg_pool", "pool"),
    F.adaptive_avg_pool1d: ("adaptive_avg_pool", "pool"),
    F.adaptive_avg_pool2d: ("adaptive_avg_pool", "pool"),
    F.adaptive_max_pool1d: ("adaptive_max_pool", "pool"),
    F.adaptive_max_pool2d: ("adaptive_max_pool", "pool"),
    torch.flatten: ("flatten", "struct"),
    torch.reshape: ("reshape", "struct"),
    torch.permute: ("permute", "struct"),
    torch.transpose: ("transpose", "struct"),
    torch.squeeze: ("squeeze", "struct"),
    torch.unsqueeze: ("unsqueeze", "struct"),
    torch.cat: ("cat", "struct"),
    torch.concat: ("cat", "struct"),
    torch.stack: ("stack", "struct"),
    torch.mean: ("mean", "struct"),
    torch.sum: ("sum", "struct"),
    torch.amax: ("amax", "struct"),
    operator.getitem: ("getitem", "struct"),
    operator.add: ("add", "value"),
    operator.sub: ("sub", "value"),
    operator.mul: ("mul", "value"),
    operator.truediv: ("div", "value"),
    torch.add: ("add", "value"),
    torch.sub: ("sub", "value"),
    torch.mul: ("mul", "value"),
}

_METHODS: dict[str, tuple[str, str]] = {
    "relu": ("relu", "zero"),
    "tanh": ("tanh", "zero"),
    "sigmoid": ("sigmoid", "value"),
    "softmax": ("softmax", "value"),
    "log_softmax": ("log_softmax", "value"),
    "flatten": ("flatten", "struct"),
    "view": ("reshape", "struct"),
    "reshape": ("reshape", "struct"),
    "permute": ("permute", "struct"),
    "transpose": ("transpose", "struct"),
    "contiguous": ("identity", "struct"),
    "squeeze": ("squeeze", "struct"),
    "unsqueeze": ("unsqueeze", "struct"),
    "mean": ("mean", "struct"),
    "sum": ("sum", "struct"),
    "amax": ("amax", "struct"),
    "size": ("size", "struct"),
    "chunk": ("chunk", "struct"),
    "split": ("split", "struct"),
    "add": ("add", "value"),
    "mul": ("mul", "value"),
}


@dataclass(frozen=True)
class OpInfo:
    """What a node is: ``kind`` names the operation (the artifact op), ``category`` its class."""

    kind: str
    category: str


# Modules of our own that tracing must keep whole (they are registered by the modules that
# define them, to avoid import cycles).
LEAF_MODULES: dict[type, OpInfo] = {}


def describe(node: fx.Node) -> str:
    """A short human name for a node: module path and type, or the function's name."""
    if node.op == "call_module":
        return f"{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.name


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> OpInfo:
    """Classify one node of a traced graph; raise UnsupportedLayerError for anything else."""
    if node.op in ("placeholder", "output", "get_attr"):
        return OpInfo(node.op, "io")
    if node.op == "call_module":
        mod = modules[str(node.target)]
        t = type(mod)
        if t in PARAM_MODULES:
            return OpInfo(PARAM_MODULES[t], "param")
        if t in LEAF_MODULES:
            return LEAF_MODULES[t]
        if t in _MODULES:
            return OpInfo(*_MODULES[t])
        raise UnsupportedLayerError(
            f"layer {node.target!r} ({t.__name__}) is not supported; deepfleet handles Linear, "
            "Conv1d, Conv2d, LSTM, GRU with BatchNorm, activations, pooling, Flatten, Dropout and "
            "concatenation: replace it or keep it outside the model you compress"
        )
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return OpInfo(*_FUNCTIONS[node.target])  # type: ignore[index]
    if node.op == "call_method" and node.target in _METHODS:
        return OpInfo(*_METHODS[str(node.target)])
    raise UnsupportedLayerError(
        f"operation {describe(node)} (node {node.name!r}) is not supported by the compressor and "
        "the device runtime; express it with supported layers (Linear, Conv1d/2d, LSTM, GRU, "
        "BatchNorm, activations, pooling, flatten, cat, reshape)"
    )


class Tracer(fx.Tracer):
    """fx tracer that keeps standard torch modules and deepfleet's own leaf modules whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in LEAF_MODULES or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; raise UnsupportedLayerError with the reason if it cannot be."""
    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError)
        raise UnsupportedLayerError(
            f"model {type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); keep forward() free of "
            "data-dependent control flow"
        ) from None
    return fx.GraphModule(model, graph, class_name=type(model).__name__)
