"""Structure analysis: which hidden units of a model can be pruned, and what each one feeds.

``analyse(model, example)`` traces the model with torch.fx and returns a :class:`Structure`:

* the prunable **groups** (one per Linear/Conv hidden layer, one per recurrent layer; output
  layers are never pruned);
* for each group, its **mask point**: the end of the chain of per-channel operations that follow
  the layer (conv -> BN -> ReLU -> pool), where DeepIoT's mask goes;
* for every parametric layer, the unit that feeds each of its **input features** (after flatten
  a channel owns a block of features, after cat the offsets shift, a bidirectional RNN's output
  has two features per unit).

The last item is found by *tag propagation*: a float64 forward pass in which every unit's output
is a distinct random integer (the unit's tag) and non-prunable values are 0. Structural operations
(flatten, cat, slicing, transpose, max-pooling, means over time) carry tags unchanged; an operation
that mixes units yields a value that is no tag, which is reported as unsupported. Integers keep
means of equal values exact in float64.

With ``inputs`` set (``features`` or ``sensors``), the model's input is one more group, the
first (:class:`InputGroups`): its units are groups of input elements. An input **feature** is
what the layers reading the input see as one input feature, found by a first tag pass in which
every input element has its own tag: the elements that reach one input column of a layer (across
positions, time steps and samples) are one unit. So LeNet-300-100 on 28x28 images has 784 pixel
units, a conv or recurrent layer one unit per channel, an LSTM reading image rows one unit per
pixel column. With ``sensors`` the units are the data's sensors (each a set of channels); a layer
whose input feature mixes two sensors is refused. Elements that no layer reads belong to no unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from deepfleet.compressors._ops import OpInfo, classify, describe, trace
from deepfleet.errors import UnsupportedLayerError

_CHAIN = ("zero", "pool", "norm")  # per-channel operations a mask point moves past
_RNN = ("lstm", "gru")


@dataclass(frozen=True)
class Group:
    """A set of prunable units sharing one keep-probability vector.

    Global unit ids are ``offset + 1 .. offset + size`` (0 means "not prunable").
    """

    index: int
    name: str  # "conv1", "lstm.l0"
    module: str  # qualified module name
    kind: str  # linear | conv1d | conv2d | lstm | gru
    layer: int  # recurrent layer index; 0 otherwise
    size: int
    offset: int


@dataclass(frozen=True)
class InputGroups:
    """The input as prunable units (group 0 of a structure analysed with ``inputs``).

    ``unit_of`` (the sample shape) gives each input element's unit, -1 for elements no layer
    reads. ``unit`` says how ``members`` index the input: ``channel`` (indices on the sample's
    first axis: every unit is whole channels), ``feature`` (the same for flat (F,) samples) or
    ``element`` (flat indices into one sample).
    ``names`` label the units (sensor names, or the index of the unit's first member).
    """

    mode: str  # features | sensors
    unit_of: np.ndarray
    unit: str  # channel | feature | element
    members: tuple[tuple[int, ...], ...]
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.members)

    def kept(self, keep: np.ndarray) -> dict[str, Any]:
        """Plain data for a keep mask of the input group: the inputs and sensors still needed."""
        keep = np.asarray(keep, dtype=bool)
        indices = sorted(i for u in np.nonzero(keep)[0] for i in self.members[u])
        out: dict[str, Any] = {"mode": self.mode, "unit": self.unit, "units": self.size,
                               "units_kept": int(keep.sum()), "inputs_kept": indices,
                               "inputs_total": int(sum(len(m) for m in self.members))}
        out["kept_names"] = [n for n, k in zip(self.names, keep) if k]
        return out


@dataclass
class Layer:
    """A parametric module: its unit groups, the unit behind each input feature, its cost shape."""

    module: str
    kind: str
    node: str
    in_ids: np.ndarray  # (in_features,) global unit id feeding each input feature, 0 = fixed
    groups: list[int | None]  # group per output layer (one entry, or one per RNN layer)
    out_size: int  # units per output layer (hidden size for an RNN)
    kernel: int = 1  # product of the kernel size
    positions: int = 1  # output positions per sample (spatial size, or time steps)
    directions: int = 1
    gates: int = 1
    bias: bool = True
    norms: list[str] = field(default_factory=list)  # BatchNorm modules in the group's chain


@dataclass
class Structure:
    graph_module: fx.GraphModule
    groups: list[Group]
    layers: list[Layer]
    mask_points: dict[str, int]  # node name -> group index (Linear/Conv groups)
    mask_axis: dict[int, int]  # group index -> channel axis of the mask point's output
    mask_ndim: dict[int, int]  # group index -> rank of the mask point's output
    info: dict[str, OpInfo]  # node name -> classification
    inputs: InputGroups | None = None  # the input group (group 0) when inputs are masked
    # cat node name -> per tensor argument, the groups whose units it carries (found by the tag
    # pass): extraction drops an argument whose groups lost every unit
    cat_groups: dict[str, list[frozenset[int]]] = field(default_factory=dict)

    @property
    def total_units(self) -> int:
        return sum(g.size for g in self.groups)

    def layer(self, module: str) -> Layer:
        for lay in self.layers:
            if lay.module == module:
                return lay
        raise KeyError(module)


INPUT_MODES = ("none", "features", "sensors")


def analyse(
    model: nn.Module, example: torch.Tensor, *, inputs: str = "none",
    sensors: tuple[str, ...] | None = None,
) -> Structure:
    """Analyse ``model`` on an example batch (at least 2 samples, any values).

    ``inputs`` (``none``, ``features``, ``sensors``) makes the input group 0 (see the module
    docstring); ``sensors`` names the sensor of each channel (axis 1 of ``example``) and is
    required for ``sensors``. Raises UnsupportedLayerError naming the layer or operation that
    cannot be handled, ValueError for a bad ``inputs``/``sensors``.
    """
    if inputs not in INPUT_MODES:
        raise ValueError(f"inputs must be one of {', '.join(INPUT_MODES)}, but got {inputs!r}")
    if inputs == "sensors" and (sensors is None or len(sensors) != example.shape[1]):
        raise ValueError(f"inputs='sensors' needs one sensor name per channel ({example.shape[1]}), "
                         f"but got {sensors!r}")
    gm = trace(model)
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    info = {n.name: classify(n, modules) for n in nodes}
    values = _example_values(gm, example)

    _check_single_use(nodes, info)
    has_param_below = _param_descendants(nodes, info)
    groups: list[Group] = []
    input_groups = None
    if inputs != "none":
        input_groups = _input_groups(gm, info, values, example, inputs, sensors)
        groups.append(Group(0, "inputs", "", "input", 0, input_groups.size, 0))
    layers: list[Layer] = []
    mask_points: dict[str, int] = {}
    mask_axis: dict[int, int] = {}
    mask_ndim: dict[int, int] = {}
    for node in nodes:
        kind = info[node.name]
        if kind.category != "param":
            continue
        mod = modules[str(node.target)]
        name = str(node.target)
        if kind.kind in _RNN:
            assert isinstance(mod, nn.RNNBase)
            if getattr(mod, "proj_size", 0):
                raise UnsupportedLayerError(f"LSTM {name!r} uses proj_size; it is not supported")
            glist: list[int | None] = []
            for layer_i in range(mod.num_layers):
                last = layer_i == mod.num_layers - 1
                if last and not has_param_below[node.name]:
                    glist.append(None)
                    continue
                g = _new_group(groups, f"{name}.l{layer_i}", name, kind.kind, layer_i, mod.hidden_size)
                glist.append(g.index)
            seq = values[node.name][0]
            layers.append(
                Layer(
                    module=name, kind=kind.kind, node=node.name, in_ids=np.zeros(0, np.int64),
                    groups=glist, out_size=mod.hidden_size,
                    positions=int(seq.shape[1] if mod.batch_first else seq.shape[0]),
                    directions=2 if mod.bidirectional else 1,
                    gates=4 if kind.kind == "lstm" else 3, bias=mod.bias,
                )
            )
            continue
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups != 1:
            raise UnsupportedLayerError(
                f"layer {name!r} is a grouped/depthwise convolution (groups={mod.groups}); "
                "only groups=1 is supported"
            )
        out = values[node.name]
        out_size = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        axis = -1 if isinstance(mod, nn.Linear) else 1
        positions = int(out.numel() // out.shape[0] // out_size)
        kernel = int(np.prod(mod.kernel_size)) if not isinstance(mod, nn.Linear) else 1
        layer = Layer(
            module=name, kind=kind.kind, node=node.name, in_ids=np.zeros(0, np.int64),
            groups=[None], out_size=out_size, kernel=kernel, positions=positions,
            bias=mod.bias is not None,
        )
        layers.append(layer)
        if has_param_below[node.name]:
            g = _new_group(groups, name, name, kind.kind, 0, out_size)
            layer.groups = [g.index]
            point, norms = _mask_point(node, info, modules)
            layer.norms = norms
            mask_points[point.name] = g.index
            mask_axis[g.index] = axis % values[point.name].dim()
            mask_ndim[g.index] = values[point.name].dim()

    if len(groups) == (input_groups is not None):
        raise UnsupportedLayerError(
            "the model has no prunable hidden layer (a Linear, Conv or recurrent layer whose "
            "output feeds another such layer); there is nothing for the compressor to shrink"
        )
    structure = Structure(gm, groups, layers, mask_points, mask_axis, mask_ndim, info, input_groups)
    _propagate_tags(structure, values, example)
    if input_groups is not None:
        _check_input_readers(structure)
    return structure


def _new_group(groups: list[Group], name: str, module: str, kind: str, layer: int, size: int) -> Group:
    offset = groups[-1].offset + groups[-1].size if groups else 0
    g = Group(len(groups), name, module, kind, layer, size, offset)
    groups.append(g)
    return g


def _example_values(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, Any]:
    """Every node's output on the example batch (eval mode, no grad)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            values[n.name] = result
            return result

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Recorder(gm).run(example)
    except Exception as exc:
        raise UnsupportedLayerError(
            f"the model fails on an input of shape {tuple(example.shape)}: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        gm.train(was_training)
    return values


def _check_single_use(nodes: list[fx.Node], info: dict[str, OpInfo]) -> None:
    seen: dict[str, str] = {}
    for n in nodes:
        if info[n.name].category in ("param", "norm") and n.op == "call_module":
            target = str(n.target)
            if target in seen:
                raise UnsupportedLayerError(
                    f"layer {target!r} is called more than once in forward(); shared layers "
                    "cannot be pruned separately: give each call its own layer"
                )
            seen[target] = n.name


def _param_descendants(nodes: list[fx.Node], info: dict[str, OpInfo]) -> dict[str, bool]:
    below: dict[str, bool] = {}
    for n in reversed(nodes):
        below[n.name] = any(
            info[u.name].category == "param" or below.get(u.name, False) for u in n.users
        )
    return below


def _mask_point(
    node: fx.Node, info: dict[str, OpInfo], modules: dict[str, nn.Module]
) -> tuple[fx.Node, list[str]]:
    """Follow the single-user chain of per-channel operations after a layer; return its end."""
    norms: list[str] = []
    point = node
    linear = info[node.name].kind == "linear"
    while len(point.users) == 1:
        (user,) = point.users
        cat = info[user.name].category
        if cat not in _CHAIN or not user.args or user.args[0] is not point:
            break
        if linear and cat == "pool":
            break
        if cat == "norm":
            norms.append(str(user.target))
        point = user
    return point, norms


# ---------------------------------------------------------------------------- tag propagation


def _tags(structure: Structure, seed: int = 12345) -> np.ndarray:
    """tag[gid] for gid in 1..total_units: distinct random integers below 2**40; tag[0] = 0."""
    rng = np.random.default_rng(seed)
    n = structure.total_units
    tags = np.unique(rng.integers(1, 2**40, size=2 * n + 8))
    rng.shuffle(tags)
    return np.concatenate([[0], tags[:n]]).astype(np.float64)


def _tag_tensor(shape: torch.Size, axis: int, tags: np.ndarray) -> torch.Tensor:
    view = [1] * len(shape)
    view[axis] = len(tags)
    return torch.as_tensor(tags, dtype=torch.float64).view(view).expand(shape).clone()


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _zeros_like(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return torch.zeros(obj.shape, dtype=torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_zeros_like(o) for o in obj)
    if isinstance(obj, list):
        return [_zeros_like(o) for o in obj]
    return obj


def _tag_run(
    gm: fx.GraphModule, info: dict[str, OpInfo], values: dict[str, Any], placeholder: torch.Tensor,
    on_param: Any, structure: Structure | None = None,
) -> tuple[Any, dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """One tag pass: (model output, each layer's recorded input, each cat node's inputs).

    ``placeholder`` is the input's tags; ``on_param(node)`` gives a layer's output tags; the
    mask points of ``structure`` (if given) set their groups' tags.
    """
    modules = dict(gm.named_modules())
    recorded: dict[str, torch.Tensor] = {}
    cats: dict[str, list[torch.Tensor]] = {}

    class TagInterpreter(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            cat = info[n.name].category
            if n.op == "placeholder":
                out = placeholder
            elif n.op in ("output", "get_attr"):
                out = super().run_node(n)
            elif cat == "param":
                args, _ = self.fetch_args_kwargs_from_env(n)
                recorded[n.name] = args[0]
                out = on_param(n)
            elif cat == "zero":
                args, _ = self.fetch_args_kwargs_from_env(n)
                out = args[0]
            elif cat == "pool":
                out = _pool_as_max(n, self, modules)
            elif cat == "struct":
                if info[n.name].kind == "cat":
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    cats[n.name] = list(args[0] if args else kwargs["tensors"])
                out = _run_struct(n, self)
            else:  # value / norm: pruned units may not reach it
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                if any(t.is_floating_point() and t.abs().sum() != 0 for t in _tensors((args, kwargs))):
                    _reject_mixing(n, structure)
                out = _zeros_like(values[n.name])
            if structure is not None and n.name in structure.mask_points:
                g = structure.mask_points[n.name]
                out = _tag_tensor(values[n.name].shape, structure.mask_axis[g], on_param.group_tags[g])
            return out

    with torch.no_grad():
        result = TagInterpreter(gm).run(placeholder)
    return result, recorded, cats


class _UnitTags:
    """Layer outputs in the second pass: recurrent layers' tags; Linear/Conv 0 until their
    mask point."""

    def __init__(self, structure: Structure, values: dict[str, Any], group_tags: dict[int, np.ndarray]):
        self.by_node = {lay.node: lay for lay in structure.layers}
        self.values, self.group_tags = values, group_tags

    def __call__(self, n: fx.Node) -> Any:
        return _param_tags(self.by_node[n.name], self.values[n.name], self.group_tags)


def _propagate_tags(structure: Structure, values: dict[str, Any], example: torch.Tensor) -> None:
    tags = _tags(structure)
    tag_to_gid = {float(t): i for i, t in enumerate(tags)}
    group_tags = {g.index: tags[g.offset + 1 : g.offset + 1 + g.size] for g in structure.groups}
    placeholder = torch.zeros(example.shape, dtype=torch.float64)
    if structure.inputs is not None:
        unit_of = structure.inputs.unit_of
        per_element = np.where(unit_of >= 0, tags[1 + np.maximum(unit_of, 0)], 0.0)  # input = group 0
        placeholder = torch.as_tensor(per_element, dtype=torch.float64).expand(example.shape).clone()
    result, recorded, cats = _tag_run(structure.graph_module, structure.info, values, placeholder,
                                      _UnitTags(structure, values, group_tags), structure)
    for t in _tensors(result):
        if t.is_floating_point() and t.abs().sum() != 0:
            raise UnsupportedLayerError(
                "outputs of prunable units reach the model's output without passing through "
                "another layer (e.g. features returned next to the logits); return only the "
                "output layer's result"
            )
    for lay in structure.layers:
        axis = -1 if lay.kind in ("linear", "lstm", "gru") else 1
        lay.in_ids = _read_ids(recorded[lay.node], axis, tag_to_gid, lay.module)
    group_of = np.zeros(structure.total_units + 1, np.int64) - 1
    for g in structure.groups:
        group_of[g.offset + 1 : g.offset + 1 + g.size] = g.index
    for name, parts in cats.items():
        structure.cat_groups[name] = [
            frozenset(int(group_of[tag_to_gid[float(v)]]) for v in np.unique(t.numpy()) if float(v) in tag_to_gid
                      and tag_to_gid[float(v)] > 0)
            for t in parts
        ]


# ---------------------------------------------------------------------------- input groups


def _input_groups(
    gm: fx.GraphModule, info: dict[str, OpInfo], values: dict[str, Any], example: torch.Tensor,
    mode: str, sensors: tuple[str, ...] | None,
) -> InputGroups:
    """The input's units (see the module docstring): a tag pass with one tag per input element,
    then the elements each layer reads in one input column are joined (union-find)."""
    shape = tuple(example.shape[1:])
    n_el = int(np.prod(shape))
    rng = np.random.default_rng(54321)
    el_tags = np.unique(rng.integers(1, 2**40, size=2 * n_el + 8))
    rng.shuffle(el_tags)
    el_tags = el_tags[:n_el].astype(np.float64)
    tag_to_el = {float(t): i for i, t in enumerate(el_tags)}
    placeholder = torch.as_tensor(el_tags.reshape(shape), dtype=torch.float64).expand(example.shape).clone()

    def hidden_zero(n: fx.Node) -> Any:
        return _zeros_like(values[n.name])

    _, recorded, _ = _tag_run(gm, info, values, placeholder, hidden_zero, None)
    parent = np.arange(n_el)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    read = np.zeros(n_el, bool)
    for node_name, t in recorded.items():
        kind = info[node_name].kind
        axis = -1 if kind in ("linear", "lstm", "gru") else 1
        v = torch.movedim(t, axis, -1).reshape(-1, t.shape[axis]).numpy()
        for j in range(v.shape[1]):
            col = np.unique(v[:, j])
            col = col[col != 0]
            if not len(col):
                continue
            try:
                els = [tag_to_el[float(x)] for x in col]
            except KeyError:
                raise UnsupportedLayerError(
                    f"cannot tell which inputs feed input {j} of node {node_name!r}: an operation "
                    "before it combines input values (e.g. a mean over channels); input masking "
                    "needs the input to reach the layers through slicing, flatten, transpose or cat"
                ) from None
            read[els] = True
            root = find(els[0])
            for e in els[1:]:
                r = find(e)
                if r != root:
                    parent[max(r, root)] = min(r, root)
                    root = min(r, root)
    roots = np.array([find(i) for i in range(n_el)])
    per_channel = n_el // shape[0]
    channel_of = np.arange(n_el) // per_channel
    if mode == "sensors":
        assert sensors is not None
        for r in np.unique(roots[read]):
            names = {sensors[c] for c in np.unique(channel_of[(roots == r) & read])}
            if len(names) > 1:
                raise UnsupportedLayerError(
                    f"inputs=sensors: a layer reads sensors {sorted(names)} in one input feature "
                    "(e.g. an LSTM over image rows); mask by sensor needs each input feature to "
                    "come from one sensor: use inputs=features"
                )
        order = [s for i, s in enumerate(sensors) if s not in sensors[:i] and read[channel_of == i].any()]
        key = np.array([order.index(sensors[c]) if read[e] else -1 for e, c in enumerate(channel_of)])
        names = tuple(order)
    else:
        firsts = sorted({int(r) for r in roots[read]})
        key = np.array([firsts.index(int(r)) if read[e] else -1 for e, r in enumerate(roots)])
        names = ()
    n_units = int(key.max()) + 1
    whole_channels = all(len(set(key[channel_of == c])) == 1 for c in range(shape[0]))
    unit = ("feature" if len(shape) == 1 else "channel") if whole_channels else "element"
    index = channel_of if whole_channels else np.arange(n_el)
    members = tuple(tuple(sorted({int(i) for i in index[key == u]})) for u in range(n_units))
    if not names:
        names = tuple(f"{unit} {m[0]}" + (f"-{m[-1]}" if len(m) > 1 else "") for m in members)
    return InputGroups(mode, key.reshape(shape), unit, members, names)


def _check_input_readers(structure: Structure) -> None:
    """A layer that reads input units reads only input units: its input is gathered as the
    model's input (a skip connection mixing the input with hidden units would need both)."""
    n_in = structure.groups[0].size
    for lay in structure.layers:
        is_input = (lay.in_ids >= 1) & (lay.in_ids <= n_in)
        if is_input.any() and not is_input.all():
            raise UnsupportedLayerError(
                f"layer {lay.module!r} reads the model's input next to other values (a skip "
                "connection); input masking needs the layers that read the input to read it alone: "
                "use inputs=none for this model"
            )


def _param_tags(lay: Layer, example_out: Any, group_tags: dict[int, np.ndarray]) -> Any:
    """Tags of a layer's outputs. Linear/Conv: zeros (their mask point sets tags later)."""
    if lay.kind not in _RNN:
        return torch.zeros(example_out.shape, dtype=torch.float64)
    seq, hidden = example_out
    H, D = lay.out_size, lay.directions
    last = lay.groups[-1]
    unit_tags = group_tags[last] if last is not None else np.zeros(H)
    seq_t = _tag_tensor(seq.shape, seq.dim() - 1, np.tile(unit_tags, D))
    h_tags = np.stack(
        [group_tags[g] if g is not None else np.zeros(H) for g in lay.groups for _ in range(D)]
    )  # (L*D, H)
    h_example = hidden[0] if isinstance(hidden, tuple) else hidden  # (L*D, B, H)
    h_n = torch.as_tensor(h_tags, dtype=torch.float64)[:, None, :].expand(h_example.shape).clone()
    if isinstance(hidden, tuple):  # LSTM: the cell state of a pruned unit is not 0: poison it
        return seq_t, (h_n, torch.full(hidden[1].shape, float("nan"), dtype=torch.float64))
    return seq_t, h_n


def _pool_as_max(n: fx.Node, interp: fx.Interpreter, modules: dict[str, nn.Module]) -> torch.Tensor:
    """Run a pooling node with max instead of average, so zero padding cannot blend tags."""
    args, kwargs = interp.fetch_args_kwargs_from_env(n)
    x = args[0]
    if n.op == "call_module":
        mod = modules[str(n.target)]
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d)):
            fn = F.max_pool1d if isinstance(mod, nn.AvgPool1d) else F.max_pool2d
            return fn(x, mod.kernel_size, mod.stride, mod.padding, ceil_mode=mod.ceil_mode)
        if isinstance(mod, nn.AdaptiveAvgPool1d):
            return F.adaptive_max_pool1d(x, mod.output_size)
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return F.adaptive_max_pool2d(x, mod.output_size)
        return mod(x)
    swap = {
        F.avg_pool1d: F.max_pool1d, F.avg_pool2d: F.max_pool2d,
        F.adaptive_avg_pool1d: F.adaptive_max_pool1d, F.adaptive_avg_pool2d: F.adaptive_max_pool2d,
    }
    if n.target not in swap:
        return fx.Interpreter.run_node(interp, n)
    fn = swap[n.target]  # type: ignore[index]
    if n.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        return fn(x, *args[1:2], **{k: v for k, v in kwargs.items() if k == "output_size"})
    # avg_pool(input, kernel_size, stride, padding, ceil_mode, count_include_pad, ...)
    geometry = dict(zip(("kernel_size", "stride", "padding", "ceil_mode"), args[1:5]))
    geometry.update({k: v for k, v in kwargs.items() if k in ("kernel_size", "stride", "padding", "ceil_mode")})
    return fn(x, **geometry)


def _run_struct(n: fx.Node, interp: fx.Interpreter) -> Any:
    """Structural ops run as they are, except sums (a sum of equal tags is no tag): use means."""
    if info_kind(n) == "sum":
        args, kwargs = interp.fetch_args_kwargs_from_env(n)
        return torch.mean(args[0], *args[1:], **kwargs)
    return fx.Interpreter.run_node(interp, n)


def info_kind(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    return getattr(n.target, "__name__", "")


def _reject_mixing(n: fx.Node, structure: Structure | None) -> None:
    if structure is None:  # the input-element pass: only input values are nonzero
        raise UnsupportedLayerError(
            f"operation {describe(n)} (node {n.name!r}) changes the input values before the first "
            "layer, where a dropped input must stay exactly zero; with deepiot.inputs set, do "
            "such preprocessing in the data, or use inputs=none"
        )
    raise UnsupportedLayerError(
        f"operation {describe(n)} (node {n.name!r}) receives the outputs of prunable units after "
        "their mask, where a pruned unit would no longer be exactly zero; put it before the "
        "concatenation/flatten, directly after its layer (e.g. conv -> BatchNorm -> ReLU)"
    )


def _read_ids(t: torch.Tensor, axis: int, tag_to_gid: dict[float, int], module: str) -> np.ndarray:
    """Unit id per input feature of a layer, from its recorded tag input."""
    v = torch.movedim(t, axis, -1).reshape(-1, t.shape[axis]).numpy()
    if np.isnan(v).any():
        raise UnsupportedLayerError(
            f"layer {module!r} reads the cell state c_n of a pruned LSTM; use its output "
            "sequence or h_n instead"
        )
    if not (v == v[:1]).all():
        raise UnsupportedLayerError(
            f"cannot tell which unit feeds each input of layer {module!r}: an operation before "
            "it mixes units across the feature axis (e.g. a reshape that splits channels)"
        )
    ids = np.zeros(v.shape[1], np.int64)
    for j, x in enumerate(v[0]):
        gid = tag_to_gid.get(float(x))
        if gid is None:
            raise UnsupportedLayerError(
                f"cannot tell which unit feeds input {j} of layer {module!r}: an operation "
                "before it combines several units (e.g. a mean or sum over the channel axis)"
            )
        ids[j] = gid
    return ids
