"""The artifact format's numpy runtime: one function per op, :class:`Model`, :func:`load_model`.

A library (Python >= 3.8, standard library + numpy and ``format.py``; this module may import
nothing else) and the format's reference: exporters are tested against it, and it is the only
runtime on i686 and 32-bit ARM devices. Host code imports it to check exports; the device
program gets it inlined into its one file (see ``bundle.py``). The graph vocabulary is
documented in ``docs/artifact-format.md``.

Contract: ``load_model(dir).run(x)`` maps a float32 batch (B, *input_shape) to the outputs the
exported PyTorch model gives (tested per op against torch, and per model end to end).
"""

import json
import math
import os

import numpy as np

from deepfleet.device_agent.format import (
    GRAPH_FORMAT,
    GRAPH_VERSION,
    ArtifactCorrupt,
    check_artifact,
    decode_tensor,
    sparse_rows,
)

# ---------------------------------------------------------------------------- operations
# Each op is fn(inputs: list of arrays, attrs: dict, w: dict of weights) -> array or tuple.


def _pad_spatial(x, pads, value=0.0):
    if not any(pads):
        return x
    width = [(0, 0), (0, 0)] + [(p, p) for p in pads]
    return np.pad(x, width, mode="constant", constant_values=value)


def _windows(x, kernel, stride, dilation):
    """Sliding windows over the trailing spatial axes: a read-only view (B, C, *out, *kernel).

    Built with as_strided directly: sliding_window_view + slicing gives the same view but
    costs ~10 us of Python per call, a tenth of a small model's whole run.
    """
    spatial, steps = x.shape[2:], x.strides[2:]
    out = tuple((n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(spatial, kernel, stride, dilation))
    if min(out) < 1:
        raise ValueError("window %s (dilation %s) is larger than the input %s"
                         % (list(kernel), list(dilation), list(spatial)))
    strides = (x.strides[:2] + tuple(st * s for st, s in zip(steps, stride))
               + tuple(st * d for st, d in zip(steps, dilation)))
    return np.lib.stride_tricks.as_strided(x, x.shape[:2] + out + tuple(kernel), strides,
                                           writeable=False)


def op_conv(inputs, a, w):
    x = _pad_spatial(inputs[0], a["padding"])
    W = w["weight"]  # (O, C, *k)
    nd = W.ndim - 2
    win = _windows(x, W.shape[2:], a["stride"], a["dilation"])  # (B, C, *out, *k), a view
    batch, out_shape = win.shape[0], win.shape[2:2 + nd]
    # im2col with the columns ordered (C, *k) x (B, *out), so that one matmul gives (O, B, *out):
    # for batch 1 that is already the output layout, and no copy of the result is needed (a
    # tensordot would give (B, *out, O) and need a moveaxis copy). The window copy is the same.
    perm = [1] + list(range(2 + nd, 2 + 2 * nd)) + [0] + list(range(2, 2 + nd))
    cols = win.transpose(perm).reshape(W[0].size, -1)
    out = W.reshape(W.shape[0], -1) @ cols  # (O, C*k) @ (C*k, B*out)
    if "bias" in w:
        out += w["bias"][:, None]
    out = out.reshape((W.shape[0], batch) + tuple(out_shape))
    return np.ascontiguousarray(out.swapaxes(0, 1), dtype=np.float32)


def op_linear(inputs, a, w):
    out = inputs[0] @ w["weight"].T
    if "bias" in w:
        out = out + w["bias"]
    return out


def op_affine(inputs, a, w):
    """Per-channel y = x * scale + shift on axis 1 (a folded-away BatchNorm that could not fold)."""
    x = inputs[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * w["scale"].reshape(shape) + w["shift"].reshape(shape)


def _pool(x, a, combine, pad_value):
    """Pool with ``combine`` (np.maximum or np.add) over each window of the kernel.

    Max and sum over a box are separable, so the windows are folded one spatial axis at a time:
    along an axis with kernel k, the k strided slices that hold each window's k elements are
    combined (k - 1 whole-array ufunc calls; 2 for a 2x2 kernel in all). A reduction over a
    window view instead runs element by element in numpy: 20x slower for LeNet's pools.
    """
    k, s, p, d = a["kernel"], a["stride"], a["padding"], a.get("dilation", [1] * len(a["kernel"]))
    nd = len(k)
    spatial = x.shape[2:]
    extra, outs = [], []
    for i in range(nd):
        n = spatial[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1
        out = (n + (s[i] - 1 if a.get("ceil_mode") else 0)) // s[i] + 1
        if a.get("ceil_mode") and (out - 1) * s[i] >= spatial[i] + p[i]:
            out -= 1  # torch: the last window must start inside the input or left padding
        outs.append(out)
        extra.append(max(0, (out - 1) * s[i] + d[i] * (k[i] - 1) + 1 - (spatial[i] + 2 * p[i])))
    if any(p) or any(extra):
        width = [(0, 0), (0, 0)] + [(pi, pi + e) for pi, e in zip(p, extra)]
        x = np.pad(x, width, mode="constant", constant_values=pad_value)
    result, fresh = x, False
    for axis in range(nd):
        ki, si, di, n = k[axis], s[axis], d[axis], outs[axis]
        head = (slice(None),) * (2 + axis)
        parts = [result[head + (slice(o * di, o * di + (n - 1) * si + 1, si),)] for o in range(ki)]
        if ki == 1:
            result = parts[0]  # only a stride (a view): copied below if nothing else happens
            continue
        acc = combine(parts[0], parts[1])
        for part in parts[2:]:
            combine(acc, part, out=acc)
        result, fresh = acc, True
    return result if fresh else result.copy()


def op_max_pool(inputs, a, w):
    return _pool(inputs[0], a, np.maximum, -np.inf)


def op_avg_pool(inputs, a, w):
    x = inputs[0]
    if a.get("count_include_pad", True) or not any(a["padding"]):
        out = _pool(x, a, np.add, 0.0)
        return (out / float(np.prod(a["kernel"]))).astype(np.float32)
    ones = np.ones((1, 1) + x.shape[2:], dtype=np.float32)
    return (_pool(x, a, np.add, 0.0) / _pool(ones, a, np.add, 0.0)).astype(np.float32)


def op_adaptive_pool(inputs, a, w):
    x = inputs[0]
    reduce = np.max if a["mode"] == "max" else np.mean
    out_size = a["output_size"]
    nd = len(out_size)
    spatial = x.shape[2:]
    if all(o == 1 for o in out_size):
        return reduce(x, axis=tuple(range(2, 2 + nd)), keepdims=True)
    bounds = [
        [(i * n // o, -(-(i + 1) * n // o)) for i in range(o)] for n, o in zip(spatial, out_size)
    ]
    out = np.empty(x.shape[:2] + tuple(out_size), dtype=np.float32)
    for idx in np.ndindex(*out_size):
        sl = tuple(slice(*bounds[i][j]) for i, j in enumerate(idx))
        out[(Ellipsis,) + idx] = reduce(x[(Ellipsis,) + sl], axis=tuple(range(2, 2 + nd)))
    return out


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # exact identity, and stable for large |x|


def _erf(x):
    # Abramowitz & Stegun 7.1.26 refined (max abs error 1.2e-7): numpy has no erf.
    t = 1.0 / (1.0 + 0.5 * np.abs(x))
    y = 1.0 - t * np.exp(
        -x * x - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
            -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
                -0.82215223 + t * 0.17087277))))))))
    )
    return np.where(x >= 0, y, -y)


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def op_act(inputs, a, w):
    x = inputs[0]
    k = a["fn"]
    if k == "relu":
        return np.maximum(x, 0)
    if k == "tanh":
        return np.tanh(x)
    if k == "sigmoid":
        return _sigmoid(x)
    if k == "leaky_relu":
        return np.where(x >= 0, x, x * np.float32(a["slope"]))
    if k == "elu":
        return np.where(x > 0, x, np.float32(a["alpha"]) * (np.exp(np.minimum(x, 0)) - 1))
    if k == "hardtanh":
        return np.clip(x, a["min"], a["max"])
    if k == "silu":
        return x * _sigmoid(x)
    if k == "gelu":
        if a.get("approximate") == "tanh":
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if k == "softmax":
        return _softmax(x, a["axis"])
    if k == "log_softmax":
        m = x.max(axis=a["axis"], keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=a["axis"], keepdims=True))
    if k == "sign":  # binarised activation: +1 for x >= 0, else -1
        return np.where(x >= 0, np.float32(1), np.float32(-1))
    raise ArtifactCorrupt("unknown activation %r" % k)


def _shape(spec, batch):
    return tuple(d["batch"] * batch if isinstance(d, dict) else d for d in spec)


def op_reshape(inputs, a, w):
    x = inputs[0]
    batch = x.shape[a["in_axis"]] // a["in_mult"] if a.get("in_axis") is not None else 0
    return x.reshape(_shape(a["shape"], batch))


def op_permute(inputs, a, w):
    return np.transpose(inputs[0], a["dims"])


def op_getitem(inputs, a, w):
    index = []
    for item in a["index"]:
        if "slice" in item:
            index.append(slice(*item["slice"]))
        elif "index" in item:
            index.append(item["index"])
        elif "none" in item:
            index.append(None)
        else:
            index.append(Ellipsis)
    return inputs[0][tuple(index)]


def op_cat(inputs, a, w):
    return np.concatenate(inputs, axis=a["axis"])


def op_stack(inputs, a, w):
    return np.stack(inputs, axis=a["axis"])


def op_reduce(inputs, a, w):
    fn = {"mean": np.mean, "sum": np.sum, "amax": np.max}[a["fn"]]
    return fn(inputs[0], axis=tuple(a["dims"]), keepdims=a["keepdim"]).astype(np.float32)


def op_squeeze(inputs, a, w):
    return np.squeeze(inputs[0], axis=tuple(a["dims"])) if a["dims"] else np.squeeze(inputs[0])


def op_unsqueeze(inputs, a, w):
    return np.expand_dims(inputs[0], a["dim"])


def op_binary(inputs, a, w):
    ops = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide}
    left = inputs[0] if a.get("left") is None else np.float32(a["left"])
    right = inputs[-1] if a.get("right") is None else np.float32(a["right"])
    return ops[a["fn"]](left, right).astype(np.float32)


def _rnn_direction(kind, xp, w_hh, b_hh, reverse):
    """xp: (B, T, G*H) input projections -> (B, T, H) outputs, final h, final c."""
    B, T, _ = xp.shape
    H = w_hh.shape[1]
    h = np.zeros((B, H), np.float32)
    c = np.zeros((B, H), np.float32)
    w_hh_t = np.ascontiguousarray(w_hh.T)
    out = np.empty((B, T, H), np.float32)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        gh = h @ w_hh_t
        if b_hh is not None:
            gh += b_hh
        if kind == "lstm":
            g = xp[:, t] + gh
            i, f, gg, o = _sigmoid(g[:, :H]), _sigmoid(g[:, H:2 * H]), np.tanh(g[:, 2 * H:3 * H]), _sigmoid(g[:, 3 * H:])
            c = f * c + i * gg
            h = o * np.tanh(c)
        else:
            x_t = xp[:, t]
            r = _sigmoid(x_t[:, :H] + gh[:, :H])
            z = _sigmoid(x_t[:, H:2 * H] + gh[:, H:2 * H])
            n = np.tanh(x_t[:, 2 * H:] + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * h
        out[:, t] = h
    return out, h, c


def op_rnn(inputs, a, w):
    """Stacked (bi)LSTM/GRU, zero initial state. Returns (sequence, h_0, c_0, h_1, c_1, ...)."""
    x = inputs[0]
    if not a["batch_first"]:
        x = np.swapaxes(x, 0, 1)
    D = 2 if a["bidirectional"] else 1
    finals = []
    for li in range(len(a["hidden"])):
        outs = []
        for d in range(D):
            p = "l%d_d%d_" % (li, d)
            xp = x @ w[p + "w_ih"].T
            if p + "b_ih" in w:
                xp = xp + w[p + "b_ih"]
            o, h, c = _rnn_direction(a["kind"], xp, w[p + "w_hh"], w.get(p + "b_hh"), d == 1)
            outs.append(o)
            finals += [h, c]
        x = np.concatenate(outs, -1) if D == 2 else outs[0]
    seq = x if a["batch_first"] else np.swapaxes(x, 0, 1)
    return (seq,) + tuple(finals)


def op_fake_quant(inputs, a, w):
    """Fixed-point activations <IL, FL>: round to nearest (ties to even, as torch.round), saturate.

    Codes span [-2^(bits-1), 2^(bits-1) - 1] when ``signed``, else [0, 2^bits - 1]; the value is
    code * 2^-frac_bits. Scaling by powers of two is exact, so this matches torch bit for bit.
    """
    step = np.float32(2.0 ** a["frac_bits"])
    lo, hi = (-(2 ** (a["bits"] - 1)), 2 ** (a["bits"] - 1) - 1) if a["signed"] else (0, 2 ** a["bits"] - 1)
    codes = np.clip(np.round(inputs[0] * step), lo, hi)
    return (codes * np.float32(2.0 ** -a["frac_bits"])).astype(np.float32)


def op_const(inputs, a, w):
    return w["value"]


def op_sparse_linear(inputs, a, w):
    """``x @ W.T + b`` on the last axis for a row-sparse W (rows, k), at the cost of its nonzeros:
    ``weight`` arrives as :func:`sparse_rows`' (index, values), both (rows, m), so output r is
    the sum over t of x[..., index[r, t]] * values[r, t] (SparseSep's sparse codes)."""
    index, values = w["weight"]
    out = (inputs[0][..., index] * values).sum(-1)  # (..., rows, m) -> (..., rows)
    if "bias" in w:
        out = out + w["bias"]
    return out.astype(np.float32)


def op_temperature(inputs, a, w):
    """Temperature scaling of logits (Guo et al., 2017): ``x / value``; the class ranking is
    unchanged, the softmax confidence is calibrated (value fitted on the validation split)."""
    return (inputs[0] / np.float32(a["value"])).astype(np.float32)


OPS = {
    "const": op_const,
    "conv": op_conv,
    "linear": op_linear,
    "affine": op_affine,
    "max_pool": op_max_pool,
    "avg_pool": op_avg_pool,
    "adaptive_pool": op_adaptive_pool,
    "act": op_act,
    "reshape": op_reshape,
    "permute": op_permute,
    "getitem": op_getitem,
    "cat": op_cat,
    "stack": op_stack,
    "reduce": op_reduce,
    "squeeze": op_squeeze,
    "unsqueeze": op_unsqueeze,
    "binary": op_binary,
    "rnn": op_rnn,
    "fake_quant": op_fake_quant,
    "sparse_linear": op_sparse_linear,
    "temperature": op_temperature,
}

# Weights an op reads in sparse form, (index, values) from ``sparse_rows``, not decoded dense.
SPARSE_WEIGHTS = {"sparse_linear": ("weight",)}


def _load_weight(op, role, ref, tensors, arrays):
    reader = sparse_rows if role in SPARSE_WEIGHTS.get(op, ()) else decode_tensor
    return reader(ref, tensors.get(ref, {}), arrays)


# ---------------------------------------------------------------------------- model


class Model:
    """A loaded artifact: ``run(x)`` maps a float32 batch (B, *input_shape) to the outputs."""

    def __init__(self, graph, arrays):
        if graph.get("format") != GRAPH_FORMAT or graph.get("version") != GRAPH_VERSION:
            raise ArtifactCorrupt(
                "graph format %r version %r is not %r version %d: update the agent"
                % (graph.get("format"), graph.get("version"), GRAPH_FORMAT, GRAPH_VERSION)
            )
        self.graph = graph
        self.input_name = graph["input"]["name"]
        self.input_shape = tuple(graph["input"]["shape"])
        self.outputs = graph["outputs"]
        tensors = graph.get("tensors", {})
        self.steps = []
        for op in graph["ops"]:
            fn = OPS.get(op["op"])
            if fn is None:
                raise ArtifactCorrupt("unknown op %r (node %r): update the agent" % (op["op"], op["name"]))
            weights = {
                role: _load_weight(op["op"], role, ref, tensors, arrays)
                for role, ref in op.get("weights", {}).items()
            }
            n_out = op.get("num_outputs", 1)
            names = [op["name"]] if n_out == 1 else ["%s:%d" % (op["name"], i) for i in range(n_out)]
            self.steps.append((fn, op["inputs"], op.get("attrs", {}), weights, names))

    def run(self, x):
        env = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        for fn, ins, attrs, weights, names in self.steps:
            out = fn([env[i] for i in ins], attrs, weights)
            if len(names) == 1:
                env[names[0]] = out
            else:
                env.update(zip(names, out))
        outs = [env[o] for o in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def load_model(directory, verify=True):
    """Load an artifact directory; with ``verify`` check its files against its name's hash.

    Raises ArtifactCorrupt when the files are missing (ArtifactIncomplete), do not match the
    hash (DigestMismatch), cannot be read or are of an unknown format.
    """
    try:
        check_artifact(directory, verify)
        with open(os.path.join(directory, "graph.json")) as f:
            graph = json.load(f)
        with np.load(os.path.join(directory, "weights.npz"), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ArtifactCorrupt("artifact %s cannot be read: %s" % (directory, exc)) from None
    return Model(graph, arrays)
