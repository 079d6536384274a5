"""The artifact format's numpy runtime: one compiler per op, :class:`Model`, :func:`load_model`.

A library (Python >= 3.8, standard library + numpy and ``format.py``; this module may import
nothing else) and the format's reference: exporters are tested against it, and it is the only
runtime on i686 and 32-bit ARM devices. Host code imports it to check exports; the device
program gets it inlined into its one file (see ``bundle.py``). The graph vocabulary is
documented in ``docs/artifact-format.md``.

Contract: ``load_model(dir).run(x)`` maps a float32 batch (B, *input_shape) to the outputs the
exported PyTorch model gives (tested per op against torch, and per model end to end).

Its cost should be the model's, not Python's: on those devices it is what a candidate is timed
with. So every op is compiled once when the model is loaded (weights transposed, concatenated
and fused into the layouts its matmuls want, scratch arrays kept per input shape), recurrent
layers project the inputs of all time steps in one matmul and step every layer of a stack (or
both directions of a layer) together, and small ops make as few numpy calls as they can: at
batch 1 each call costs more than a compressed layer's arithmetic.
"""

import functools
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
# Each op of the graph vocabulary is a *compiler*: ``compile(attrs, weights)`` does once what
# does not depend on the input (transposed and fused weight matrices, index tuples, the ufunc
# to call) and returns ``run(*inputs) -> array or tuple``. :class:`Model` compiles every op
# once at load; ``OPS[name](inputs, attrs, weights)`` compiles and runs one call (the per-op
# reference interface that tests and the ONNX checks use). Compiled ops keep their output and
# scratch arrays for the last input shape (allocating them per call costs page faults at batch
# 64 and Python time at batch 1), so a compiled op, and a Model, runs one call at a time and
# may return views of its own arrays: Model.run copies the graph's outputs before returning.
# Reasons for the shapes of the code below: at batch 1 every numpy call costs ~0.5-1 us of
# fixed overhead, far more than the arithmetic of a compressed layer, so ops are written to
# make few calls (one matmul for the input projections of all time steps, the recurrent
# loop's 7 ufunc calls a step on preallocated views, im2col into a preallocated buffer).

_F32 = np.float32
_ZEROS = np.zeros(0, _F32)  # grown by _zeros, never written


@functools.lru_cache(maxsize=256)
def _zeros(shape):
    """Zeros of ``shape``, read-only: a view of one buffer shared by every op (cached by shape). As the second
    operand of a ReLU's np.maximum a same-shaped array costs ~0.35 us a call, a 0-d one
    (broadcast) ~0.5 us and a Python float ~0.7 us. Untouched zero pages are not resident, so
    the buffer adds no measurable memory."""
    global _ZEROS
    n = int(np.prod(shape))
    if _ZEROS.size < n:
        _ZEROS = np.zeros(n, _F32)
        _ZEROS.flags.writeable = False
    return _ZEROS[:n].reshape(shape)


class _Buf:
    """An output array reused while the requested shape stays the same."""

    __slots__ = ("shape", "array")

    def __init__(self):
        self.shape = None
        self.array = None

    def get(self, shape):
        if shape != self.shape:
            self.array = np.empty(shape, _F32)
            self.shape = shape
        return self.array


def _windows(x, kernel, stride, dilation):
    """Sliding windows over the trailing spatial axes: a read-only view (B, C, *out, *kernel)."""
    spatial, steps = x.shape[2:], x.strides[2:]
    out = tuple((n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(spatial, kernel, stride, dilation))
    if min(out) < 1:
        raise ValueError("window %s (dilation %s) is larger than the input %s"
                         % (list(kernel), list(dilation), list(spatial)))
    strides = (x.strides[:2] + tuple(st * s for st, s in zip(steps, stride))
               + tuple(st * d for st, d in zip(steps, dilation)))
    return np.lib.stride_tricks.as_strided(x, x.shape[:2] + out + tuple(kernel), strides,
                                           writeable=False)


class _Conv:
    """Convolution as a matmul of the weights (O, C*k [+ bias]) by im2col columns per sample.

    Per input shape, a zero-padded input buffer, a view of the columns on it and the column
    buffer are made once; a call is then one copy into the padded buffer, one copy of the
    columns, and one (batched) matmul that writes (B, O, positions) directly, the bias riding
    along as a row of ones. With stride 1 the positions run over whole padded rows (the input
    flattened): every column is then a contiguous run of the input, not a run of one output
    row (LeNet's second conv: runs of 8), which makes the copy several times faster at batch 64
    for k - 1 wasted positions per row; the output is a view that skips them. ``relu``: the ReLU
    that follows is applied in place.
    """

    def __init__(self, a, w, relu=False):
        W = w["weight"]  # (O, C, *k)
        self.kernel, self.relu = tuple(W.shape[2:]), relu
        self.pads, self.stride = tuple(a["padding"]), tuple(a["stride"])
        self.dilation = tuple(a["dilation"])
        o, ck = W.shape[0], W[0].size
        self.has_bias = "bias" in w
        self.Wm = np.empty((o, ck + self.has_bias), _F32)  # (O, C*k [+ 1])
        self.Wm[:, :ck] = W.reshape(o, ck)
        if self.has_bias:
            self.Wm[:, ck] = w["bias"]
        self.shape = None

    def _setup(self, shape):
        b, c, spatial = shape[0], shape[1], shape[2:]
        nd = len(spatial)
        full = tuple(n + 2 * p for n, p in zip(spatial, self.pads))
        out = tuple(n - d * (k - 1) for n, k, d in zip(full, self.kernel, self.dilation))
        if all(s == 1 for s in self.stride) and min(out) >= 1:
            plane = int(np.prod(full))
            rows = [int(np.prod(full[i + 1:])) for i in range(nd)]  # element steps of the axes
            span = out[0] * rows[0]  # positions: out[0] whole padded rows
            reach = span + sum(d * (k - 1) * r for k, d, r in zip(self.kernel, self.dilation, rows))
            flat = np.zeros(b * c * plane + max(0, reach - plane), _F32)  # the last rows overrun
            padded = flat[:b * c * plane].reshape((b, c) + full)
            item = flat.itemsize
            self.src = np.lib.stride_tricks.as_strided(
                flat, (b, c) + self.kernel + (span,),
                (c * plane * item, plane * item) + tuple(d * r * item for d, r in zip(self.dilation, rows))
                + (item,), writeable=False)
            view = (Ellipsis,) + tuple(slice(0, n) for n in out[1:])
            positions, shaped = span, lambda res: res.reshape((b, -1, out[0]) + full[1:])[view]
        else:
            padded = np.zeros((b, c) + full, _F32)
            win = _windows(padded, self.kernel, self.stride, self.dilation)  # (B, C, *out, *k)
            out = win.shape[2:2 + nd]
            self.src = win.transpose([0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd)))
            positions, shaped = int(np.prod(out)), lambda res: res.reshape(res.shape[:2] + out)
        self.inner = padded[(Ellipsis,) + tuple(slice(p, p + n) for p, n in zip(self.pads, spatial))]
        ck = self.Wm.shape[1] - self.has_bias
        self.cols = np.empty((b, ck + self.has_bias, positions), _F32)
        if self.has_bias:
            self.cols[:, ck] = 1.0
        self.dst = self.cols[:, :ck].reshape(self.src.shape)
        self.res = np.empty((b, self.Wm.shape[0], positions), _F32)
        self.out = shaped(self.res)  # (B, O, *out), a view of res
        self.single = (self.cols[0], self.res[0]) if b == 1 else None
        self.zeros = _zeros(self.res.shape)
        self.shape = shape

    # Copies by slice assignment: ~0.15 us a call less than np.copyto (no dispatch layer)
    def __call__(self, x):
        if x.shape != self.shape:
            self._setup(x.shape)
        self.inner[...] = x
        self.dst[...] = self.src
        if self.single:  # batch 1: np.dot costs ~1 us less per call than a batched matmul
            np.dot(self.Wm, *self.single)
        else:
            np.matmul(self.Wm, self.cols, out=self.res)
        if self.relu:
            np.maximum(self.res, self.zeros, out=self.res)
        return self.out


class _Linear:
    """``x @ W.T + b`` on the last axis, W.T made contiguous once; ``relu`` fused in place."""

    def __init__(self, a, w, relu=False):
        self.WT = np.ascontiguousarray(w["weight"].T)  # (in, out)
        self.bias = w.get("bias")
        self.relu = relu
        self.shape = None

    def __call__(self, x):
        if x.shape != self.shape:
            self.out = np.empty(x.shape[:-1] + self.WT.shape[1:], _F32)
            self.zeros = _zeros(self.out.shape)
            self.shape = x.shape
        out = self.out
        if x.ndim == 2:
            np.dot(x, self.WT, out)
        else:
            np.matmul(x, self.WT, out=out)
        if self.bias is not None:
            np.add(out, self.bias, out)
        if self.relu:
            np.maximum(out, self.zeros, out=out)
        return out


def _affine(a, w):
    """Per-channel y = x * scale + shift on axis 1 (a folded-away BatchNorm that could not fold)."""
    scale, shift, buf = w["scale"], w["shift"], _Buf()

    def run(x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = buf.get(x.shape)
        np.multiply(x, scale.reshape(shape), out=out)
        return np.add(out, shift.reshape(shape), out=out)
    return run


class _Pool:
    """Max or sum pooling over each window of the kernel (``combine``: np.maximum or np.add).

    Max and sum over a box are separable, so the windows are folded one spatial axis at a time:
    along an axis with kernel k, the k strided slices that hold each window's k elements are
    combined (k - 1 whole-array ufunc calls; 2 for a 2x2 kernel in all). A reduction over a
    window view instead runs element by element in numpy: 20x slower for LeNet's pools. The
    slices, the padded input buffer (when padding or ceil mode needs one) and each axis's
    output are made once per input shape.
    """

    def __init__(self, a, combine, pad_value, relu=False):
        self.relu = relu  # a ReLU before a max pool, applied after it (they commute): 1/k the work
        self.k, self.s, self.p = a["kernel"], a["stride"], a["padding"]
        self.d = a.get("dilation") or [1] * len(self.k)
        self.ceil = bool(a.get("ceil_mode"))
        self.combine, self.pad_value = combine, pad_value
        self.shape = self.src = None

    def out_sizes(self, spatial):
        """(output size, extra right padding) per spatial axis, as torch computes them."""
        sizes = []
        for n, k, s, p, d in zip(spatial, self.k, self.s, self.p, self.d):
            span = n + 2 * p - d * (k - 1) - 1
            out = (span + (s - 1 if self.ceil else 0)) // s + 1
            if self.ceil and (out - 1) * s >= n + p:
                out -= 1  # torch: the last window must start inside the input or left padding
            sizes.append((out, max(0, (out - 1) * s + d * (k - 1) + 1 - (n + 2 * p))))
        return sizes

    def _setup(self, shape):
        sizes = self.out_sizes(shape[2:])
        if any(self.p) or any(e for _, e in sizes):
            padded = np.full(shape[:2] + tuple(n + 2 * p + e for n, p, (_, e) in
                                               zip(shape[2:], self.p, sizes)), self.pad_value, _F32)
            self.padded = padded
            self.inner = padded[(Ellipsis,) + tuple(slice(p, p + n) for p, n in zip(self.p, shape[2:]))]
            current = padded.shape
        else:
            self.padded = self.inner = None
            current = shape
        self.stages = []  # (slice tuples of the source, output array)
        for axis, (k, s, d, (n, _)) in enumerate(zip(self.k, self.s, self.d, sizes)):
            if k == 1 and s == 1:
                continue
            head = (slice(None),) * (2 + axis)
            parts = [head + (slice(o * d, o * d + (n - 1) * s + 1, s),) for o in range(k)]
            current = current[:2 + axis] + (n,) + current[3 + axis:]
            self.stages.append((parts, np.empty(current, _F32)))
        self.shape = shape

    def _plan(self, x):
        """This pooling's numpy calls on ``x`` (or the padded buffer) as argument-free calls:
        made again only for a new input array (a compiled op before it returns the same one)."""
        calls, src = [], self.padded if self.padded is not None else x
        for parts, out in self.stages:
            if len(parts) == 1:
                calls.append(functools.partial(np.copyto, out, src[parts[0]]))  # a stride alone
            else:
                calls.append(functools.partial(self.combine, src[parts[0]], src[parts[1]], out=out))
                calls += [functools.partial(self.combine, out, src[p], out=out) for p in parts[2:]]
            src = out
        if not self.stages:  # a 1x1 window, stride 1: a copy, so that callers may write to it
            out = np.empty(src.shape, _F32)
            calls.append(functools.partial(np.copyto, out, src))
            src = out
        if self.relu:
            calls.append(functools.partial(np.maximum, src, _zeros(src.shape), out=src))
        self.calls, self.result, self.src = calls, src, x

    def __call__(self, x):
        if x is not self.src:
            if x.shape != self.shape:
                self._setup(x.shape)
            self._plan(x)
        if self.padded is not None:
            self.inner[...] = x
        for call in self.calls:
            call()
        return self.result


def _max_pool(a, w, relu=False):
    return _Pool(a, np.maximum, -np.inf, relu)


def _avg_pool(a, w):
    pool = _Pool(a, np.add, 0.0)
    size = float(np.prod(a["kernel"]))
    counts = {}

    def run(x):
        out = pool(x)
        if a.get("count_include_pad", True) or not any(a["padding"]):
            return np.true_divide(out, size, out=out)
        n = counts.get(x.shape[2:])
        if n is None:  # how many input elements each window holds
            n = counts[x.shape[2:]] = _Pool(a, np.add, 0.0)(np.ones((1, 1) + x.shape[2:], _F32)).copy()
        return np.true_divide(out, n, out=out)
    return run


def _adaptive_pool(a, w):
    reduce = np.max if a["mode"] == "max" else np.mean
    out_size = a["output_size"]
    nd = len(out_size)
    axes = tuple(range(2, 2 + nd))

    def run(x):
        if all(o == 1 for o in out_size):
            return reduce(x, axis=axes, keepdims=True)
        bounds = [[(i * n // o, -(-(i + 1) * n // o)) for i in range(o)]
                  for n, o in zip(x.shape[2:], out_size)]
        out = np.empty(x.shape[:2] + tuple(out_size), dtype=_F32)
        for idx in np.ndindex(*out_size):
            sl = tuple(slice(*bounds[i][j]) for i, j in enumerate(idx))
            out[(Ellipsis,) + idx] = reduce(x[(Ellipsis,) + sl], axis=axes)
        return out
    return run


def _erf(x):
    # Abramowitz & Stegun 7.1.26 refined (max abs error 1.2e-7): numpy has no erf.
    t = 1.0 / (1.0 + 0.5 * np.abs(x))
    y = 1.0 - t * np.exp(
        -x * x - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
            -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
                -0.82215223 + t * 0.17087277))))))))
    )
    return np.where(x >= 0, y, -y)


def _sigmoid_into(x, out):
    """0.5 * (1 + tanh(x / 2)): the exact identity, stable for large |x|, written into ``out``."""
    np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    np.add(out, 1.0, out=out)
    return np.multiply(out, 0.5, out=out)


def _act(a, w):
    k, buf = a["fn"], _Buf()
    if k == "relu":
        return lambda x: np.maximum(x, _zeros(x.shape), out=buf.get(x.shape))
    if k == "tanh":
        return lambda x: np.tanh(x, out=buf.get(x.shape))
    if k == "sigmoid":
        return lambda x: _sigmoid_into(x, buf.get(x.shape))
    if k == "silu":
        return lambda x: np.multiply(x, _sigmoid_into(x, buf.get(x.shape)), out=buf.get(x.shape))
    if k == "leaky_relu":
        slope = _F32(a["slope"])
        return lambda x: np.where(x >= 0, x, x * slope)
    if k == "elu":
        alpha = _F32(a["alpha"])
        return lambda x: np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))
    if k == "hardtanh":
        lo, hi = a["min"], a["max"]
        return lambda x: np.clip(x, lo, hi)
    if k == "gelu":
        if a.get("approximate") == "tanh":
            c = math.sqrt(2 / math.pi)
            return lambda x: 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x ** 3)))
        return lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if k in ("softmax", "log_softmax"):
        axis, log = a["axis"], k == "log_softmax"

        def softmax(x):
            z = x - x.max(axis=axis, keepdims=True)
            e = np.exp(z)
            s = e.sum(axis=axis, keepdims=True)
            return z - np.log(s) if log else e / s
        return softmax
    if k == "sign":  # binarised activation: +1 for x >= 0, else -1
        return lambda x: np.where(x >= 0, _F32(1), _F32(-1))
    raise ArtifactCorrupt("unknown activation %r" % k)


def _reshape(a, w):
    spec, axis, mult = a["shape"], a.get("in_axis"), a.get("in_mult")
    n_batch = sum(isinstance(d, dict) for d in spec)
    if n_batch <= 1 and (n_batch == 0 or axis is not None):
        # At most one batch-sized axis: numpy infers it (-1), a constant shape, one call.
        fixed = tuple(-1 if isinstance(d, dict) else d for d in spec)
        return lambda x: x.reshape(fixed)

    def run(x):
        batch = x.shape[axis] // mult if axis is not None else 0
        return x.reshape(tuple(d["batch"] * batch if isinstance(d, dict) else d for d in spec))
    return run


def _permute(a, w):
    dims = tuple(a["dims"])
    return lambda x: x.transpose(dims)


def _getitem(a, w):
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
    index = tuple(index)
    return lambda x: x[index]


def _cat(a, w):
    axis = a["axis"]
    return lambda *xs: np.concatenate(xs, axis=axis)


def _stack(a, w):
    axis = a["axis"]
    return lambda *xs: np.stack(xs, axis=axis)


@functools.lru_cache(maxsize=64)
def _weights_of_sum(n, mean):
    """The vector that sums (``mean``: averages) n values in one matmul."""
    v = np.full(n, 1.0 / n if mean else 1.0, _F32)
    v.flags.writeable = False
    return v


def _reduce(a, w):
    fn = a["fn"]
    ufunc = {"mean": np.add, "sum": np.add, "amax": np.maximum}[fn].reduce
    dims, keep, mean = tuple(a["dims"]), bool(a["keepdim"]), fn == "mean"
    one_sum = fn != "amax" and len(dims) == 1  # may run as a matmul, by the input's rank

    def run(x):
        if one_sum and dims[0] % x.ndim == x.ndim - 2:
            # a sum over the second-to-last axis (a sequence's time) as one matmul by a vector:
            # 3x faster than add.reduce at batch 1 and 8x at batch 64 (deepsense, bilstm)
            out = np.matmul(_weights_of_sum(x.shape[-2], mean), x)
            return np.expand_dims(out, x.ndim - 2) if keep else out
        out = ufunc(x, axis=dims, keepdims=keep)
        if not mean:
            return out
        n = 1
        for d in dims:
            n *= x.shape[d]  # as np.mean: the float32 sum divided by the count
        return np.true_divide(out, n, out=out) if isinstance(out, np.ndarray) else _F32(out / n)
    return run


def _squeeze(a, w):
    dims = tuple(a["dims"])
    return (lambda x: np.squeeze(x, axis=dims)) if dims else np.squeeze


def _unsqueeze(a, w):
    dim = a["dim"]
    return lambda x: np.expand_dims(x, dim)


def _binary(a, w):
    ufunc = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide}[a["fn"]]
    left = None if a.get("left") is None else _F32(a["left"])
    right = None if a.get("right") is None else _F32(a["right"])
    if left is not None:
        return lambda x: ufunc(left, x).astype(_F32, copy=False)
    if right is not None:
        return lambda x: ufunc(x, right).astype(_F32, copy=False)
    return lambda *xs: ufunc(xs[0], xs[-1]).astype(_F32, copy=False)


def _fake_quant(a, w):
    """Fixed-point activations <IL, FL>: round to nearest (ties to even, as torch.round), saturate.

    Codes span [-2^(bits-1), 2^(bits-1) - 1] when ``signed``, else [0, 2^bits - 1]; the value is
    code * 2^-frac_bits. Scaling by powers of two is exact, so this matches torch bit for bit.
    """
    step, unit = _F32(2.0 ** a["frac_bits"]), _F32(2.0 ** -a["frac_bits"])
    bits = a["bits"]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if a["signed"] else (0, 2 ** bits - 1)
    buf = _Buf()

    def run(x):
        out = buf.get(x.shape)
        np.multiply(x, step, out=out)
        np.rint(out, out=out)
        np.maximum(out, lo, out=out)
        np.minimum(out, hi, out=out)
        return np.multiply(out, unit, out=out)
    return run


def _const(a, w):
    value = w["value"]
    return lambda: value


# ---------------------------------------------------------------------------- recurrent layers
# torch's gate order -> blocks of the fused layout, for the input and the recurrent weights.
# LSTM: [i, f, o | g] (the three sigmoid gates first, so that one slice holds them). GRU:
# [r, z', z | n_x, n_h] where z' is z with its weights not negated (exp(+v): 1 / (1 - z)), so that
# [n | h] / [1 / (1 - z) | 1 / z] and one add give h = (1 - z) * n + z * h; n's input and
# recurrent parts stay apart because r multiplies only the recurrent one.
_BLOCKS = {
    "lstm": (((0,), (0,)), ((1,), (1,)), ((3,), (3,)), ((2,), (2,))),  # torch i, f, g, o
    "gru": (((0,), (0,)), ((1, 2), (1, 2)), ((3,), (4,))),  # torch r, z, n
}
# blocks whose weights are negated (exp gives exp(-v)); the others' exp gives exp(+v) or is unused
_NEGATED = {"lstm": (0, 1, 2), "gru": (0, 2)}
# batch x hidden^2 from which a GRU drops z' (block 1) and n's slot in the row, and forms
# h = n + z * (h - n) in three calls instead of two: a wider matmul, and a row that is strided
# from batch 2 on, cost more than the call saved (deepsense, us, with z' / without: compressed,
# hidden 23, 156 / 170 at batch 1, 379 / 361 at 2, 2226 / 1628 at 64; original, hidden 128,
# 526 / 387 at batch 1)
_Z_TWICE = 1024
# Input weights are folded into the per-step matmul (the inputs written beside the state before
# the loop) when that adds at most this many multiply-accumulates per sample and step: less than
# the ~0.5 us numpy call it saves (adding a precomputed projection); wider inputs are projected
# for all time steps in one matmul instead, which runs at GEMM rather than GEMV speed.
_FOLD_MACS = 4096
# batch x hidden^2 from which layers and directions run apart rather than in one joint loop
# (measured for bidirectional layers: at batch 64 two loops win from hidden 23 on, at batch 1
# stepping together wins up to 64 and beyond).
_APART = 32768


class _RnnGroup:
    """Units (layer, direction) of one ``rnn`` op stepped through time together.

    ``units``: (layer, direction, hidden size, source) where source is None when the unit reads
    the group's input, or the index of the unit whose h it reads (a layer above the first in a
    wavefront). Unidirectional stacks run as a wavefront (layer l at time t - l in step t:
    T + L - 1 steps for L layers instead of L * T); a bidirectional layer runs its two
    directions in one loop (step s: forward time s, backward time T - 1 - s).

    Each step is one matmul of the row [h of every unit, 1, inputs if folded] by a block matrix
    holding every unit's recurrent weights, the input weights of units fed by another unit (or
    folded in), and all biases (against the 1), then 7 ufunc calls on preallocated views for
    the gates of every unit at once (8 for a GRU from :data:`_Z_TWICE`). The sigmoid gates'
    weights are negated, so that exp gives exp(-v) and sigmoid(v) = 1 / (1 + exp(-v)) (as torch
    computes it): products with a gate become divisions by 1 + exp(-v), which saves a call per
    step.
    """

    def __init__(self, kind, units, w, wavefront):
        self.lstm, self.units, self.wavefront = kind == "lstm", units, wavefront
        self.sizes = [u[2] for u in units]
        self.offs = [sum(self.sizes[:i]) for i in range(len(units))]
        hs = self.hs = sum(self.sizes)
        n_blocks, n_x = (4 if self.lstm else 5), 4  # all blocks; those with an input part
        self.pre = [i for i, u in enumerate(units) if u[3] is None]  # units reading the input
        h_pre = self.h_pre = self.sizes[self.pre[0]]
        if any(self.sizes[i] != h_pre for i in self.pre):
            raise ArtifactCorrupt("rnn: directions of one layer have different hidden sizes %s"
                                  % [self.sizes[i] for i in self.pre])
        n_in = self.n_in = w["l%d_d%d_w_ih" % units[self.pre[0]][:2]].shape[1]
        self.fold = len(self.pre) * n_in * 4 * hs <= _FOLD_MACS
        width = hs + 1 + (len(self.pre) * n_in if self.fold else 0)
        R = np.zeros((width, n_blocks * hs), _F32)  # (row [h..., 1, x...], gate columns)
        WX = np.zeros((n_in, len(self.pre) * n_x * h_pre), _F32)  # compact, when not folded
        negated = _NEGATED[kind]

        def cols(block, u):
            start = block * hs + self.offs[u]
            return slice(start, start + self.sizes[u])

        for u, (layer, d, h, src) in enumerate(units):
            p = "l%d_d%d_" % (layer, d)
            w_ih, w_hh, b_ih, b_hh = w[p + "w_ih"], w[p + "w_hh"], w.get(p + "b_ih"), w.get(p + "b_hh")
            rows_h = slice(self.offs[u], self.offs[u] + h)
            for j, (x_blocks, h_blocks) in enumerate(_BLOCKS[kind]):
                rows = slice(j * h, (j + 1) * h)
                for bh in h_blocks:
                    sign = -1.0 if bh in negated else 1.0
                    R[rows_h, cols(bh, u)] = w_hh[rows].T * sign
                    if b_hh is not None:
                        R[hs, cols(bh, u)] += b_hh[rows] * sign
                for bx in x_blocks:
                    sign = -1.0 if bx in negated else 1.0
                    if b_ih is not None:
                        R[hs, cols(bx, u)] += b_ih[rows] * sign
                    if src is not None:
                        R[self.offs[src]:self.offs[src] + self.sizes[src], cols(bx, u)] = w_ih[rows].T * sign
                    elif self.fold:
                        start = hs + 1 + self.pre.index(u) * n_in
                        R[start:start + n_in, cols(bx, u)] = w_ih[rows].T * sign
                    else:
                        k = self.pre.index(u) * n_x + bx
                        WX[:, k * h:(k + 1) * h] = w_ih[rows].T * sign
        self.full, self.once = (R, WX), None  # once: R and WX without a GRU's z', made when needed
        self.key = None

    def _choose(self, b):
        """The layout for batch ``b``: a GRU's blocks are [r, z', z, n_x, n_h] below
        :data:`_Z_TWICE`, else [r, z, n_x, n_h]. Sets R, WX, the blocks that go through exp
        (n_sig) and those with an input part (n_x), and n's slot (lead)."""
        self.twice = self.lstm or b * self.hs * self.hs < _Z_TWICE
        self.n_sig, self.n_x = (3, 4) if self.twice else (2, 3)
        # A GRU's row starts with a slot for n when z' is kept, so that [n | h] is one view (the
        # matmul then reads a strided row, which costs at larger batches)
        self.lead = self.hs if self.twice and not self.lstm else 0
        if self.twice:
            self.R, self.WX = self.full
            return
        if self.once is None:
            (R, WX), hs, h = self.full, self.hs, self.h_pre
            gone = [k * 4 * h + j for k in range(len(self.pre)) for j in range(h, 2 * h)]  # each unit's z'
            self.once = (np.ascontiguousarray(np.delete(R, np.s_[hs:2 * hs], axis=1)),
                         np.ascontiguousarray(np.delete(WX, gone, axis=1)))
        self.R, self.WX = self.once

    def _setup(self, b, t, batch_first):
        self._choose(b)
        hs, n_units, n_pre, lead = self.hs, len(self.units), len(self.pre), self.lead
        steps = t + n_units - 1 if self.wavefront else t
        # row s: step s's input [(n,) h..., 1, x...]; the matmul reads it from h on
        hist = self.hist = np.zeros((steps + 1, b, lead + self.R.shape[0]), _F32)
        hist[:, :, lead + hs] = 1.0
        backward = [not self.wavefront and self.units[u][1] == 1 for u in self.pre]
        self.copies = []  # (destination, source or None for the input in time-major order)
        if self.fold:
            for k in range(n_pre):
                start = lead + hs + 1 + k * self.n_in
                dst = hist[:t, :, start:start + self.n_in]
                self.copies.append((dst[::-1] if backward[k] else dst, None))
            xp = [None] * steps
        else:
            xp = np.zeros((steps, b, self.n_x * hs), _F32)
            xpv = xp.reshape(steps, b, self.n_x, hs)
            self.P = np.empty((b * t, self.WX.shape[1]), _F32)
            pv = self.P.reshape(((b, t) if batch_first else (t, b)) + (n_pre, self.n_x, self.h_pre))
            if batch_first:
                pv = pv.transpose(1, 0, 2, 3, 4)
            for k, u in enumerate(self.pre):
                dst = xpv[:t, :, :, self.offs[u]:self.offs[u] + self.sizes[u]]
                self.copies.append((dst[::-1] if backward[k] else dst, pv[:, :, k]))  # backward: time T-1-s
        self.G = np.empty((b, self.R.shape[1]), _F32)
        # [tanh(g) | c] side by side: one division by [1/sigmoid(i) | 1/sigmoid(f)] (adjacent in G)
        # gives both products of c = f * c + i * g, and one add sums them (a call fewer a step)
        self.GC = np.zeros((b, 2 * hs), _F32)
        self.C = self.GC[:, hs:]
        self.T1 = np.empty((b, 2 * hs if self.lead else hs), _F32)
        self.ones = np.ones((b, self.n_sig * hs), _F32)
        hooks = [[] for _ in range(steps)]
        self.c_final = []
        if self.wavefront:
            for s in range(n_units - 1):  # units above layer s have not started: keep them at 0
                hooks[s].append(_filler(hist[s + 1, :, lead + self.offs[s + 1]:lead + hs]))
                if self.lstm:
                    hooks[s].append(_filler(self.C[:, self.offs[s + 1]:]))
        for u in range(n_units):
            sl = slice(self.offs[u], self.offs[u] + self.sizes[u])
            if not self.lstm:
                self.c_final.append(np.zeros((b, self.sizes[u]), _F32))
            elif not self.wavefront or u == n_units - 1:
                self.c_final.append(self.C[:, sl])
            else:  # the unit's last step comes before the loop ends: keep its c then
                keep = np.empty((b, self.sizes[u]), _F32)
                hooks[t - 1 + u].append(_copier(keep, self.C[:, sl]))
                self.c_final.append(keep)
        self.N = None if self.twice else np.empty((b, hs), _F32)  # a GRU's n when it has no slot in the row

        def gru_views(s):  # a GRU's: [n | h before] and n's slot, or h before and N
            if self.lstm:
                return None, None
            return (hist[s, :, :2 * hs], hist[s, :, :hs]) if self.twice else (hist[s, :, :hs], self.N)
        # Per step: the bound row.dot (an ndarray method skips np.dot's dispatch: ~0.1 us a
        # step), where h goes, the GRU's views, the input part (None when folded), hooks.
        self.steps = [(hist[s, :, lead:].dot, hist[s + 1, :, lead:lead + hs], *gru_views(s), xp[s], hooks[s] or None)
                      for s in range(steps)]
        self.finals, self.outs = [], []  # views of hist: what a call returns
        for u in range(n_units):
            sl = slice(lead + self.offs[u], lead + self.offs[u] + self.sizes[u])
            row = t + u if self.wavefront else t  # the state after the unit's last step
            self.finals += [hist[row, :, sl], self.c_final[u]]
            if self.wavefront and u == n_units - 1:  # layer u at time t: after step t + u
                self.outs.append(hist[u + 1:u + 1 + t, :, sl])
            elif not self.wavefront:  # backward at time t: after step T - 1 - t
                self.outs.append(hist[t:0:-1, :, sl] if self.units[u][1] == 1 else hist[1:t + 1, :, sl])
        self.key = (b, t, batch_first)

    def __call__(self, x, batch_first):
        """x: (B, T, in) when ``batch_first`` else (T, B, in) -> ([time-major outputs (T, B, H)
        of the last layer's units], [h, c] of every unit in unit order): views of this group's
        arrays (lists the caller must not change)."""
        b, t = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
        if self.key != (b, t, batch_first):
            self._setup(b, t, batch_first)
        if not self.fold:
            np.matmul(x.reshape(b * t, x.shape[2]), self.WX, out=self.P)  # every step's input part
        x_tm = x.transpose(1, 0, 2) if batch_first else x
        for dst, src in self.copies:
            dst[...] = x_tm if src is None else src
        if self.lstm:
            self.C.fill(0.0)
        with np.errstate(over="ignore"):  # exp(-v) = inf is right: the gate is then 0
            self.loop()()
        return self.outs, self.finals

    def loop(self):
        """The loop the layout chosen last runs (``_loop_lstm``, ``_loop_gru`` with z' kept, or
        ``_loop_gru_once``), bound: one call steps through every time step."""
        return self._loop_lstm if self.lstm else self._loop_gru if self.twice else self._loop_gru_once

    def work(self):
        """What the last call did, as (multiply-accumulates, loop steps, gate elements): the
        per-step matmuls' over the whole block matrix (its zero blocks included) plus the input
        projection when not folded, the steps of the loop, and the elements the per-step numpy
        calls touch (G's, summed over steps). Zeros before the first call."""
        if self.key is None:
            return 0, 0, 0
        steps, (rows, cols) = len(self.steps), self.R.shape
        b = self.G.shape[0]
        project = 0 if self.fold else self.P.shape[0] * self.WX.shape[0] * self.WX.shape[1]
        return steps * b * rows * cols + project, steps, steps * self.G.size

    # The loops pass outputs positionally and add arrays, not Python scalars: both cost time.
    def _loop_lstm(self):
        add, div, exp, tanh = np.add, np.true_divide, np.exp, np.tanh
        R, G, GC, C, T1, ones, hs = self.R, self.G, self.GC, self.C, self.T1, self.ones, self.hs
        sig, i_f, o, g = G[:, :3 * hs], G[:, :2 * hs], G[:, 2 * hs:3 * hs], G[:, 3 * hs:]
        tanh_g = GC[:, :hs]
        for row_dot, h_next, _, _, x, hooks in self.steps:
            row_dot(R, G)
            if x is not None:
                add(G, x, G)
            exp(sig, sig)
            add(sig, ones, sig)  # 1 / sigmoid(v) for i, f, o
            tanh(g, tanh_g)
            div(GC, i_f, GC)  # [i * tanh(g) | f * c]
            add(tanh_g, C, C)  # c = f * c + i * g
            tanh(C, T1)
            div(T1, o, h_next)  # h = o * tanh(c)
            if hooks:
                for hook in hooks:
                    hook()

    def _loop_gru(self):
        add, div, exp, tanh = np.add, np.true_divide, np.exp, np.tanh
        R, G, T2, ones, hs = self.R, self.G, self.T1, self.ones, self.hs
        gx, sig, r, zz = G[:, :4 * hs], G[:, :3 * hs], G[:, :hs], G[:, hs:3 * hs]
        n_x, n_h = G[:, 3 * hs:4 * hs], G[:, 4 * hs:]
        new_part, old_part = T2[:, :hs], T2[:, hs:]
        for row_dot, h_next, nh, n, x, hooks in self.steps:
            row_dot(R, G)
            if x is not None:
                add(gx, x, gx)
            exp(sig, sig)
            add(sig, ones, sig)  # 1 / sigmoid(v) for r, 1 / (1 - z), 1 / z
            div(n_h, r, n)
            add(n, n_x, n)
            tanh(n, n)  # n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), beside h in the row
            div(nh, zz, T2)  # [(1 - z) * n | z * h]
            add(new_part, old_part, h_next)
            if hooks:
                for hook in hooks:
                    hook()

    def _loop_gru_once(self):
        add, sub, div, exp, tanh = np.add, np.subtract, np.true_divide, np.exp, np.tanh
        R, G, T1, ones, hs = self.R, self.G, self.T1, self.ones, self.hs
        gx, sig, r, z = G[:, :3 * hs], G[:, :2 * hs], G[:, :hs], G[:, hs:2 * hs]
        n_x, n_h = G[:, 2 * hs:3 * hs], G[:, 3 * hs:]
        for row_dot, h_next, h, n, x, hooks in self.steps:
            row_dot(R, G)
            if x is not None:
                add(gx, x, gx)
            exp(sig, sig)
            add(sig, ones, sig)  # 1 / sigmoid(v) for r, z
            div(n_h, r, n)
            add(n, n_x, n)
            tanh(n, n)
            sub(h, n, T1)
            div(T1, z, T1)
            add(n, T1, h_next)  # h = n + z * (h - n)
            if hooks:
                for hook in hooks:
                    hook()


def _filler(view):
    return lambda: view.fill(0.0)


def _copier(dst, src):
    return lambda: np.copyto(dst, src)


class _Rnn:
    """Stacked (bi)LSTM/GRU, zero initial state, per-layer hidden sizes: (sequence, h_0, c_0,
    h_1, c_1, ...) per layer and direction (c is zeros for a GRU).

    The layers of a unidirectional stack step together (a wavefront), the two directions of a
    bidirectional layer too, unless batch x hidden^2 reaches _APART: the zero blocks of the
    joint matrix then cost more than more loops of numpy calls, and each layer (direction)
    runs alone. Groups are built on first use.
    """

    def __init__(self, a, w):
        self.kind, self.w, self.batch_first = a["kind"], w, a["batch_first"]
        self.hidden = [int(h) for h in a["hidden"]]
        self.bidirectional = a["bidirectional"]
        self.groups = {}

    def _group(self, key):
        """key: "stack" (every layer, one direction), (layer, "both") or (layer, direction)."""
        g = self.groups.get(key)
        if g is None:
            if key == "stack":
                units = [(i, 0, h, None if i == 0 else i - 1) for i, h in enumerate(self.hidden)]
            else:
                dirs = (0, 1) if key[1] == "both" else (key[1],)
                units = [(key[0], d, self.hidden[key[0]], None) for d in dirs]
            g = self.groups[key] = _RnnGroup(self.kind, units, self.w, key == "stack")
        return g

    def work(self):
        """:meth:`_RnnGroup.work` summed over the groups built so far: those of the calls made,
        so the last call's when every call had one batch size."""
        return tuple(sum(w) for w in zip((0, 0, 0), *(g.work() for g in self.groups.values())))

    def __call__(self, x):
        batch_first = self.batch_first
        b = x.shape[0] if batch_first else x.shape[1]
        if not self.bidirectional and b * max(self.hidden) ** 2 < _APART:
            outs, finals = self._group("stack")(x, batch_first)
            seq = outs[0]
        else:
            seq, finals = x, []
            for i, h in enumerate(self.hidden):
                if not self.bidirectional:
                    keys = [(i, 0)]
                else:
                    keys = [(i, "both")] if b * h * h < _APART else [(i, 0), (i, 1)]
                outs = []
                for key in keys:
                    o, f = self._group(key)(seq, batch_first)
                    outs += o
                    finals += f
                seq = np.concatenate(outs, axis=2)  # (T, B, 2H): forward, backward
                batch_first = False  # time-major from the first layer's output on
        if self.batch_first:
            seq = seq.transpose(1, 0, 2)
        return (seq,) + tuple(finals)


def _conv(a, w):
    return _Conv(a, w)


def _linear(a, w):
    return _Linear(a, w)


def _rnn(a, w):
    return _Rnn(a, w)


def _gather(a, w):
    """The entries ``indices`` of axis ``axis`` (the inputs a compressed model still reads)."""
    indices, axis = np.asarray(a["indices"], dtype=np.int64), a["axis"]
    return lambda x: np.take(x, indices, axis=axis)


def _sparse_linear(a, w):
    """``x @ W.T + b`` on the last axis for a row-sparse W (rows, k), at the cost of its nonzeros:
    ``weight`` arrives as :func:`sparse_rows`' (index, values), both (rows, m), so output r is
    the sum over t of x[..., index[r, t]] * values[r, t] (SparseSep's sparse codes)."""
    index, values = w["weight"]
    bias = w.get("bias")

    def run(x):
        out = (x[..., index] * values).sum(-1)  # (..., rows, m) -> (..., rows)
        if bias is not None:
            out += bias
        return out.astype(_F32, copy=False)
    return run


def _temperature(a, w):
    """Temperature scaling of logits (Guo et al., 2017): ``x / value``; the class ranking is
    unchanged, the softmax confidence is calibrated (value fitted on the validation split)."""
    value = _F32(a["value"])
    return lambda x: (x / value).astype(_F32, copy=False)


#: op name -> compiler(attrs, weights) -> run(*inputs).
COMPILERS = {
    "const": _const,
    "conv": _conv,
    "linear": _linear,
    "affine": _affine,
    "max_pool": _max_pool,
    "avg_pool": _avg_pool,
    "adaptive_pool": _adaptive_pool,
    "act": _act,
    "reshape": _reshape,
    "permute": _permute,
    "getitem": _getitem,
    "cat": _cat,
    "stack": _stack,
    "reduce": _reduce,
    "squeeze": _squeeze,
    "unsqueeze": _unsqueeze,
    "binary": _binary,
    "rnn": _rnn,
    "fake_quant": _fake_quant,
    "gather": _gather,
    "sparse_linear": _sparse_linear,
    "temperature": _temperature,
}
_FUSE_RELU = {"conv": _Conv, "linear": _Linear, "max_pool": _max_pool}  # ops that can apply a ReLU


def _reference(name, compiler):
    def op(inputs, a, w):
        return compiler(a, w)(*inputs)
    op.__name__ = op.__qualname__ = "op_" + name
    op.__doc__ = "The %r op: fn(inputs: list of arrays, attrs, weights) -> array or tuple." % name
    return op


#: op name -> fn(inputs: list of arrays, attrs: dict, weights: dict) -> array or tuple: one
#: call, compiled for it (the per-op reference interface; Model compiles once instead).
OPS = {name: _reference(name, c) for name, c in COMPILERS.items()}
op_conv, op_max_pool, op_avg_pool, op_rnn = OPS["conv"], OPS["max_pool"], OPS["avg_pool"], OPS["rnn"]

# Weights an op reads in sparse form, (index, values) from ``sparse_rows``, not decoded dense.
SPARSE_WEIGHTS = {"sparse_linear": ("weight",)}


def _load_weight(op, role, ref, tensors, arrays):
    reader = sparse_rows if role in SPARSE_WEIGHTS.get(op, ()) else decode_tensor
    return reader(ref, tensors.get(ref, {}), arrays)


# ---------------------------------------------------------------------------- model


class Model:
    """A loaded artifact: ``run(x)`` maps a float32 batch (B, *input_shape) to the outputs.

    ``steps`` lists (op function, input names, attrs, weights, output names) in graph order, for
    callers that want every intermediate value (:data:`OPS` functions). ``run`` executes the ops
    compiled once at construction, with values in a list of slots rather than a dict, and a
    ReLU folded into the max pool after it or the conv or linear before it (see _relu_folds).
    A Model keeps scratch arrays between calls: one ``run`` at a time per Model.
    """

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
        self._compile()

    def _relu_folds(self):
        """{relu step: step that applies it}: a ReLU read only by a max pool is applied after
        the pool (max and ReLU commute; the pool's output is smaller), else a ReLU that alone
        reads a conv's or linear's output is applied in place by that layer."""
        ops = self.graph["ops"]
        readers, producer = {}, {}
        for k, (_, ins, _, _, names) in enumerate(self.steps):
            for name in ins:
                readers.setdefault(name, []).append(k)
            for name in names:
                producer[name] = k
        folds = {}
        for k, (_, ins, attrs, _, names) in enumerate(self.steps):
            if ops[k]["op"] != "act" or attrs.get("fn") != "relu" or len(ins) != 1:
                continue
            used, source = readers.get(names[0], []), ins[0]
            if names[0] in self.outputs:
                continue
            if len(used) == 1 and ops[used[0]]["op"] == "max_pool":
                folds[k] = used[0]
            elif (source in producer and ops[producer[source]]["op"] in ("conv", "linear")
                  and len(readers[source]) == 1 and source not in self.outputs):
                folds[k] = producer[source]
        return folds

    def _compile(self):
        folds = self._relu_folds()
        with_relu = set(folds.values())
        slot = {self.input_name: 0}
        program = []
        for k, (_, ins, attrs, weights, names) in enumerate(self.steps):
            if k in folds:  # the ReLU's value is its input's (relu applied there or later)
                slot[names[0]] = slot[ins[0]]
                continue
            op = self.graph["ops"][k]["op"]
            run = _FUSE_RELU[op](attrs, weights, relu=True) if k in with_relu else COMPILERS[op](attrs, weights)
            for name in names:
                slot[name] = len(slot)
            ins_slots = tuple(slot[i] for i in ins)
            outs = tuple(slot[n] for n in names)
            program.append((run, ins_slots[0] if len(ins_slots) == 1 else ins_slots,
                            outs[0] if len(outs) == 1 else outs))
        self._program = program
        self._run = _straight_line(program, [slot[o] for o in self.outputs])

    def recurrent_work(self, batch=1):
        """What this model's recurrent layers execute in one run at ``batch`` (see
        :meth:`_RnnGroup.work`): {"macs", "steps", "elems"}, summed over its rnn ops; zeros
        without one. Runs the model once on zeros (layouts are chosen on first use): call it on
        a Model that has run at no other batch size. Host code's view of the runtime's plan
        (the latency predictor's features), not a device measurement."""
        rnns = [run for run, _, _ in self._program if isinstance(run, _Rnn)]
        if rnns:
            self.run(np.zeros((batch,) + self.input_shape, np.float32))
        return dict(zip(("macs", "steps", "elems"), (sum(w) for w in zip((0, 0, 0), *(r.work() for r in rnns)))))

    def run(self, x):
        outs = self._run(np.ascontiguousarray(x, dtype=np.float32))
        # Copies: ops return their own scratch arrays (or views of them), which the next run
        # overwrites; callers keep what run returns.
        outs = [np.array(v, dtype=np.float32) for v in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _straight_line(program, out_slots):
    """The program as one Python function over local variables, e.g. ``v1 = f0(v0)``.

    A loop over the steps with the values in a list costs ~0.8 us an op, a third of a
    compressed MLP's whole run; straight-line code costs a call. The source holds only
    generated names (``v`` + slot, ``f`` + step), never a name from the artifact.
    """
    lines, env = ["def run(v0):"], {}
    for k, (fn, ins, outs) in enumerate(program):
        env["f%d" % k] = fn
        args = ", ".join("v%d" % i for i in (ins if isinstance(ins, tuple) else (ins,)))
        targets = ", ".join("v%d" % i for i in outs) + "," if isinstance(outs, tuple) else "v%d" % outs
        lines.append("    %s = f%d(%s)" % (targets, k, args))
    lines.append("    return (%s,)" % ", ".join("v%d" % i for i in out_slots))
    exec(compile("\n".join(lines), "<deepfleet graph>", "exec"), env)
    return env["run"]


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
