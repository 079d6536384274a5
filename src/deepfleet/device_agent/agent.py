#!/usr/bin/env python3
"""deepfleet device agent: the ONE file copied to devices.

Python >= 3.8, standard library + numpy only (no torch, pandas, pyarrow, ray): it must run on an
Intel Edison or a small ARM board. This module may not import anything else; a test checks the
import allowlist under ``python -I``.

Two parts:

* the artifact format's numpy runtime: ``load_model(artifact_dir)`` reads ``graph.json`` +
  ``weights.npz`` (verifying the directory's content hash) and returns a :class:`Model` whose
  ``run(x)`` reproduces the exported PyTorch model's outputs;
* the device protocol (``python3 agent.py serve``): a persistent loop that answers one JSON
  object per line on stdin with one JSON object per line on stdout (hello, ping, measure, infer,
  bye), measuring latency distributions and energy per inference. The request and response
  fields are documented at the "protocol" section below.

Run ``python3 agent.py hello`` on a device to see what the agent finds there.
"""

import collections
import ctypes
import datetime
import gc
import glob
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback

import numpy as np

# 0.2.0: the serve protocol (hello/ping/measure/infer/bye), energy sources, BLAS thread control.
# 0.2.1: faster conv (as_strided windows, one im2col matmul, no moveaxis copy) and pooling (one
#        axis at a time over strided slices, not a reduction over a window view): same outputs,
#        different timings (lenet5 batch 1 about 3x faster).
# 0.3.0: encoded weights (fixed-point codes, codebooks, packed bits) decoded at load; the
#        compressor label of pipeline manifests ("deepiot+fixedpoint").
AGENT_VERSION = "0.3.0"
GRAPH_FORMAT = "deepfleet-graph"
GRAPH_VERSION = 1
ARTIFACT_FILES = ("graph.json", "weights.npz", "manifest.json")


# ---------------------------------------------------------------------------- artifact identity


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_of(file_digests):
    """sha256 of an artifact from ``{file name: that file's sha256 hex}`` (the ARTIFACT_FILES):
    over the sorted file names and each file's own sha256."""
    h = hashlib.sha256()
    for name in sorted(ARTIFACT_FILES):
        h.update(name.encode() + b"\0" + file_digests[name].encode() + b"\n")
    return h.hexdigest()


def artifact_digest(directory):
    """sha256 of an artifact directory (see ``digest_of``).

    The artifact directory is named by this digest; a mismatch means a corrupt artifact.
    """
    return digest_of({name: file_digest(os.path.join(directory, name)) for name in ARTIFACT_FILES})


class ArtifactCorrupt(Exception):
    """The artifact's files do not match the hash it is named by, or cannot be read."""


# ---------------------------------------------------------------------------- tensor decoding


# The weight encodings decode_tensor understands (the tests decode one of each).
ENCODINGS = ("float32", "fixed", "scaled", "codebook", "pq", "rq", "binary")


def _ints(spec, arrays, key, *, count, signed):
    """The integer array ``spec[key]`` names, as int64.

    Codes narrower than a byte are bit-packed (``spec["packed"]`` = bits per code, big-endian
    bits, two's complement when ``signed``); otherwise they are stored in an integer dtype.
    """
    a = arrays[spec[key]]
    bits = spec.get("packed")
    if not bits:
        return a.astype(np.int64)
    flat = np.unpackbits(a.reshape(-1).astype(np.uint8), count=count * bits).reshape(count, bits)
    vals = flat.astype(np.int64) @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))
    if signed:
        vals = vals - ((vals >> (bits - 1)) << bits)
    return vals


def decode_tensor(name, spec, arrays):
    """The float32 value of weight ``name`` from its ``tensors`` entry and the npz arrays.

    Encodings (fields of the entry besides ``encoding`` and ``shape``; array names refer to
    weights.npz; "packed" marks bit-packed codes, see ``_ints``):

    * ``float32``  the array ``name`` itself;
    * ``fixed``    ``codes * 2^-frac_bits`` (fixed point <IL, FL>, FL = frac_bits);
    * ``scaled``   ``codes * scale`` (per-tensor or per-channel scale array);
    * ``codebook`` ``codebook[indices]`` (k-means weight sharing);
    * ``pq``       product quantisation: rows of ``rows`` = shape[0] values split into
      subvectors of ``dim`` (zero-padded); ``codebooks`` (S, k, dim) holds one codebook per
      subvector position, ``indices`` (rows, S) picks an entry of each;
    * ``rq``       residual quantisation: the flattened tensor split into subvectors of ``dim``
      (zero-padded); the sum over stages t of ``codebooks[t][indices[t]]``, stage by stage;
    * ``binary``   ``+scale`` where a bit is 1, ``-scale`` where it is 0 (packed bits).
    """
    enc = spec.get("encoding", "float32")
    if enc == "float32":
        return np.asarray(arrays[name], dtype=np.float32)
    shape = spec["shape"]
    n = math.prod(int(d) for d in shape)
    if enc == "fixed":  # integer codes * 2^-frac_bits
        codes = _ints(spec, arrays, "codes", count=n, signed=True)
        return (codes.astype(np.float32) * np.float32(2.0 ** -spec["frac_bits"])).reshape(shape)
    if enc == "scaled":  # integer codes * per-tensor or per-channel scale
        codes = arrays[spec["codes"]].astype(np.float32)
        scale = np.asarray(arrays[spec["scale"]], dtype=np.float32)
        return (codes * scale).reshape(shape)
    if enc == "codebook":  # codebook[indices]
        book = np.asarray(arrays[spec["codebook"]], dtype=np.float32)
        return book[_ints(spec, arrays, "indices", count=n, signed=False)].reshape(shape)
    if enc == "pq":
        books = np.asarray(arrays[spec["codebooks"]], dtype=np.float32)  # (S, k, d)
        rows, (S, _, d) = int(shape[0]), books.shape
        idx = _ints(spec, arrays, "indices", count=rows * S, signed=False).reshape(rows, S)
        sub = books[np.arange(S)[None, :], idx]  # (rows, S, d)
        return sub.reshape(rows, S * d)[:, : n // rows].reshape(shape)
    if enc == "rq":
        books = np.asarray(arrays[spec["codebooks"]], dtype=np.float32)  # (T, k, d)
        T, _, d = books.shape
        P = -(-n // d)
        idx = _ints(spec, arrays, "indices", count=T * P, signed=False).reshape(T, P)
        acc = books[0][idx[0]]
        for t in range(1, T):  # stage by stage, in float32, as the compressor sums them
            acc = acc + books[t][idx[t]]
        return acc.reshape(-1)[:n].reshape(shape)
    if enc == "binary":
        bits = np.unpackbits(arrays[spec["bits"]].reshape(-1), count=n).astype(bool)
        scale = np.float32(spec["scale"])
        return np.where(bits, scale, -scale).astype(np.float32).reshape(shape)
    raise ArtifactCorrupt("weight %r has unknown encoding %r: update the agent" % (name, enc))


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
}


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
                role: decode_tensor(ref, tensors.get(ref, {}), arrays)
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

    Raises ArtifactCorrupt when the files are missing, unreadable or do not match the hash.
    """
    missing = [f for f in ARTIFACT_FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ArtifactCorrupt("artifact %s lacks %s" % (directory, ", ".join(missing)))
    if verify:
        expected = os.path.basename(os.path.normpath(directory))
        actual = artifact_digest(directory)
        if actual != expected:
            raise ArtifactCorrupt(
                "artifact %s is corrupt: its content hashes to %s; upload it again" % (directory, actual)
            )
    try:
        with open(os.path.join(directory, "graph.json")) as f:
            graph = json.load(f)
        with np.load(os.path.join(directory, "weights.npz"), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ArtifactCorrupt("artifact %s cannot be read: %s" % (directory, exc)) from None
    return Model(graph, arrays)


# ============================================================================ protocol
#
# ``python3 agent.py serve``: one JSON object per line on stdin, one JSON object per line on
# stdout (flushed after each), diagnostics on stderr only. Anything else that writes to stdout
# (a stray print, a C library) is sent to stderr, so the protocol stream cannot be corrupted.
# End of stdin ends the agent (exit 0), as does ``bye``.
#
# Every response has "ok", "op" (the request's op), "agent_ms" (time spent inside the agent)
# and, when the request had one, "id" (echoed so that a client can match answers). A failure is
# {"ok": false, "error": "<what and how to fix it>", "kind": "<kind>"} and the loop keeps serving.
# Kinds: bad_request (malformed JSON, unknown op or field, bad value), artifact_missing,
# artifact_corrupt (hash mismatch, unreadable or unknown format), backend_unavailable,
# energy_unavailable (an explicitly named sensor is not there), internal (a bug: traceback on
# stderr).
#
# Requests (defaults in brackets):
#   {"op": "hello"[, "energy": ENERGY]}  ->  agent_version, protocol, pid, python, numpy, machine,
#       system, release, hostname, cpu_model, cpu_count, affinity, governor, freq_mhz,
#       freq_source, thermal_zones [{zone, type, temp_c}], energy_sources [{source, path, sensor,
#       kind, simulated}], energy_notes, backends (names whose runtime is installed; only numpy
#       is imported), backend_versions, blas {library, vendor, threads, settable}, ops.
#   {"op": "ping"}  ->  {"ok": true}: the cheapest round trip (per-request overhead).
#   {"op": "measure", "artifact": DIR (required, already on the device),
#       "warmup" [5], "min_runs" [10], "max_runs" [10000], "min_seconds" [1.0],
#       "max_seconds" [30.0], "batch" [1], "threads" [null = leave as found], "backend"
#       ["numpy" | "onnxruntime" | "torch"], "ci_target" [0.02, null = stop at the minimum],
#       "ci_level" [0.95], "seed" [0], "cpus" [null = inherited affinity], "disable_gc" [true],
#       "verify" [true], "thermal": {"path", "settle_max_s" [30], "window_s" [2], "tolerance_c"
#       [0.5]}, "energy": ENERGY}
#     ENERGY = {"source" ["auto" | "rapl" | "hwmon" | "power_supply" | "command" | "none"],
#       "path" [null = /sys/class/<kind>; a class dir or one sensor dir], "channel" [null = first
#       power channel, e.g. "power1" or "curr2"], "command" [null; argv list or string],
#       "unit" ["W" | "J"] (what the command prints), "sample_hz" [10], "idle_s" [0.5],
#       "simulated" [null; true or a note: the sensor is a model, not a meter]}
#     -> see ``measure()`` for the response fields.
#     Worst-case duration: settle_max_s + idle_s + warm-up + max_seconds + one run: clients
#     should set their reply deadline from that.
#   {"op": "infer", "artifact": DIR, "input": nested list (B, *input_shape) [null: the
#       measure input from "batch" and "seed"], "backend" ["numpy"]}  ->  outputs (nested lists),
#       shapes, artifact_hash.
#   {"op": "bye"}  ->  {"ok": true}, then exit 0.
#
# External meter command contract (energy source "command"): the agent runs the argv once per
# sample (no shell) and takes the FIRST number printed on stdout: instantaneous power in watts
# with "unit": "W", or a cumulative energy counter in joules with "unit": "J" (the agent takes
# differences). A non-zero exit status or no number is a sensor error. Spawning costs the device
# a few ms of CPU per sample: keep sample_hz low (<= 10) with a command meter.

PROTOCOL_VERSION = 1
BACKENDS = ("numpy", "onnxruntime", "torch")
# Optional backend files next to the artifact's three files (DESIGN §5). The artifact hash does
# not cover them, so responses carry their own sha256.
BACKEND_FILES = {"onnxruntime": "model.onnx", "torch": "model.ts"}
MODEL_CACHE_SIZE = 4  # models kept loaded: enough to alternate A/B, bounded for 512 MB boards
ENERGY_SOURCES = ("auto", "rapl", "hwmon", "power_supply", "command", "none")
ENERGY_ROOTS = {"rapl": "/sys/class/powercap", "hwmon": "/sys/class/hwmon",
                "power_supply": "/sys/class/power_supply"}
THERMAL_ROOT = "/sys/class/thermal"
SIM_HWMON_NAME = "deepfleet_sim"  # the name powersim.py gives its hwmon device
# DESIGN §6 energy table (32-bit float operations, 45 nm, as used by the DeepIoT paper), in pJ.
MULT_PJ = 3.7
ADD_PJ = 0.9
DRAM_PJ_PER_32BIT = 640.0
EXACT_CI_LIMIT = 5000  # above this many runs the median CI uses the normal approximation


class AgentError(Exception):
    """A request that cannot be served; ``kind`` is reported next to the message."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind


def log(message):
    sys.stderr.write("agent[%d]: %s\n" % (os.getpid(), message))
    sys.stderr.flush()


def _finite(x, digits=None):
    """A JSON-safe float: None for NaN/inf/None (strict JSON has no NaN), optionally rounded."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


# ---------------------------------------------------------------------------- request fields

_REQUIRED = object()
_NUMBER = (int, float)


def _field(req, key, kinds, default, accepted, check=None, nullable=False, where=""):
    """``req[key]`` (or ``default``) if it is an instance of ``kinds`` passing ``check``.

    A bool is never taken for a number. Raises AgentError(bad_request) naming the field, the bad
    value and what is accepted.
    """
    value = req.get(key, default)
    if value is _REQUIRED:
        raise AgentError("bad_request", "%s%r is required: give %s" % (where, key, accepted))
    if value is None and nullable:
        return None
    good = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if good and check is not None:
        good = check(value)
    if not good:
        raise AgentError("bad_request", "%s%r must be %s, but got %r" % (where, key, accepted, value))
    return value


def _no_unknown(req, known, where):
    unknown = sorted(set(req) - set(known))
    if unknown:
        raise AgentError("bad_request", "%sunknown field(s) %s; accepted: %s"
                         % (where, ", ".join(map(repr, unknown)), ", ".join(sorted(known))))


ENERGY_KEYS = ("source", "path", "channel", "command", "unit", "sample_hz", "idle_s", "simulated")
THERMAL_KEYS = ("path", "settle_max_s", "window_s", "tolerance_c")
MEASURE_KEYS = ("op", "id", "artifact", "warmup", "min_runs", "max_runs", "min_seconds",
                "max_seconds", "batch", "threads", "backend", "ci_target", "ci_level", "seed",
                "cpus", "disable_gc", "verify", "thermal", "energy")


def parse_energy(raw):
    """The ``energy`` settings of a request, validated, with defaults filled in."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise AgentError("bad_request", "'energy' must be an object with keys %s, but got %r"
                         % (", ".join(ENERGY_KEYS), raw))
    _no_unknown(raw, ENERGY_KEYS, "energy: ")
    w = "energy."
    spec = {
        "source": _field(raw, "source", (str,), "auto", "one of " + ", ".join(ENERGY_SOURCES),
                         lambda v: v in ENERGY_SOURCES, where=w),
        "path": _field(raw, "path", (str,), None, "a directory on the device", nullable=True, where=w),
        "channel": _field(raw, "channel", (str,), None, "a channel such as 'power1' or 'curr2'",
                          lambda v: re.match(r"^(power|curr)\d+$", v) is not None, nullable=True, where=w),
        "unit": _field(raw, "unit", (str,), "W", "'W' (watts per reading) or 'J' (cumulative joules)",
                       lambda v: v in ("W", "J"), where=w),
        "sample_hz": _field(raw, "sample_hz", _NUMBER, 10.0, "a rate in (0, 1000] samples per second",
                            lambda v: 0 < v <= 1000, where=w),
        "idle_s": _field(raw, "idle_s", _NUMBER, 0.5, "seconds of idle power measurement in [0, 60]",
                         lambda v: 0 <= v <= 60, where=w),
        "simulated": _field(raw, "simulated", (str, bool), None, "true or a note saying what is simulated",
                            nullable=True, where=w),
    }
    command = raw.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    if command is not None and not (isinstance(command, list) and command
                                    and all(isinstance(c, str) for c in command)):
        raise AgentError("bad_request", "energy.'command' must be a command line string or a "
                         "non-empty list of strings, but got %r" % (raw.get("command"),))
    if spec["source"] == "command" and not command:
        raise AgentError("bad_request", "energy source 'command' needs energy.'command': the meter "
                         "program to run per sample")
    spec["command"] = command
    if spec["simulated"] is False:
        spec["simulated"] = None
    return spec


def parse_thermal(raw):
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise AgentError("bad_request", "'thermal' must be an object with keys %s, but got %r"
                         % (", ".join(THERMAL_KEYS), raw))
    _no_unknown(raw, THERMAL_KEYS, "thermal: ")
    w = "thermal."
    return {
        "path": _field(raw, "path", (str,), None, "a directory on the device", nullable=True, where=w),
        "settle_max_s": _field(raw, "settle_max_s", _NUMBER, 30.0, "seconds in [0, 600]",
                               lambda v: 0 <= v <= 600, where=w),
        "window_s": _field(raw, "window_s", _NUMBER, 2.0, "seconds in (0, 60]",
                           lambda v: 0 < v <= 60, where=w),
        "tolerance_c": _field(raw, "tolerance_c", _NUMBER, 0.5, "degrees Celsius > 0",
                              lambda v: v > 0, where=w),
    }


def parse_measure(req):
    """A measure request, validated, with defaults filled in (see the protocol comment)."""
    _no_unknown(req, MEASURE_KEYS, "measure: ")
    positive = lambda v: v >= 1  # noqa: E731
    spec = {
        "artifact": _field(req, "artifact", (str,), _REQUIRED, "the artifact directory on the device"),
        "warmup": _field(req, "warmup", (int,), 5, "an integer >= 0", lambda v: v >= 0),
        "min_runs": _field(req, "min_runs", (int,), 10, "an integer >= 1", positive),
        "max_runs": _field(req, "max_runs", (int,), 10000, "an integer >= 1", positive),
        "min_seconds": _field(req, "min_seconds", _NUMBER, 1.0, "seconds >= 0", lambda v: v >= 0),
        "max_seconds": _field(req, "max_seconds", _NUMBER, 30.0, "seconds > 0", lambda v: v > 0),
        "batch": _field(req, "batch", (int,), 1, "an integer >= 1", positive),
        "threads": _field(req, "threads", (int,), None, "an integer >= 1 or null", positive, nullable=True),
        "backend": _field(req, "backend", (str,), "numpy", "one of " + ", ".join(BACKENDS),
                          lambda v: v in BACKENDS),
        "ci_target": _field(req, "ci_target", _NUMBER, 0.02,
                            "a relative width (high - low) / p50 in (0, 10], or null",
                            lambda v: 0 < v <= 10, nullable=True),
        "ci_level": _field(req, "ci_level", _NUMBER, 0.95, "a confidence level in (0.5, 1)",
                           lambda v: 0.5 < v < 1),
        "seed": _field(req, "seed", (int,), 0, "an integer >= 0", lambda v: v >= 0),
        "cpus": _field(req, "cpus", (list,), None, "a non-empty list of CPU numbers or null",
                       lambda v: bool(v) and all(isinstance(c, int) and not isinstance(c, bool)
                                                 and c >= 0 for c in v), nullable=True),
        "disable_gc": _field(req, "disable_gc", (bool,), True, "true or false"),
        "verify": _field(req, "verify", (bool,), True, "true or false"),
        "thermal": parse_thermal(req.get("thermal")),
        "energy": parse_energy(req.get("energy")),
    }
    if spec["max_runs"] < spec["min_runs"]:
        raise AgentError("bad_request", "'min_runs' <= 'max_runs' must hold, but got (min_runs=%d, "
                         "max_runs=%d)" % (spec["min_runs"], spec["max_runs"]))
    if spec["max_seconds"] < spec["min_seconds"]:
        raise AgentError("bad_request", "'min_seconds' <= 'max_seconds' must hold, but got "
                         "(min_seconds=%g, max_seconds=%g)" % (spec["min_seconds"], spec["max_seconds"]))
    return spec


# ---------------------------------------------------------------------------- statistics


def _median_rank(n, level):
    """(l, coverage): the largest 1-based rank l with P(B <= l-1) <= (1-level)/2, B ~ Bin(n, 1/2).

    [x_(l), x_(n-l+1)] then covers the population median with probability coverage =
    1 - 2 P(B <= l-1) >= level, for ANY continuous distribution (order statistics; no normality
    assumed: latency distributions are skewed and multi-modal). l = 0 when n is too small.
    Exact (log-space binomial, no underflow) up to EXACT_CI_LIMIT; normal approximation with
    continuity correction above, where it is accurate to a rank.
    """
    tail = (1.0 - level) / 2.0
    if n > EXACT_CI_LIMIT:
        z = statistics.NormalDist().inv_cdf(1.0 - tail)
        rank = int(math.floor(n / 2.0 + 0.5 - z * math.sqrt(n) / 2.0))
        cdf = statistics.NormalDist(n / 2.0, math.sqrt(n) / 2.0).cdf(rank - 0.5)
        return max(rank, 0), 1.0 - 2.0 * cdf
    log_norm = math.lgamma(n + 1) - n * math.log(2.0)
    cdf = 0.0
    k = 0
    while k < n:
        p = math.exp(log_norm - math.lgamma(k + 1) - math.lgamma(n - k + 1))
        if cdf + p > tail:
            break
        cdf += p
        k += 1
    return k, 1.0 - 2.0 * cdf  # ranks 0..k-1 were summed: P(B <= k-1) = cdf


def median_ci(sorted_values, level=0.95):
    """Distribution-free CI of the median of ascending ``sorted_values``: (low, high, coverage).

    None when there are too few values for any interval at ``level`` (fewer than 6 at 95 %).
    """
    n = len(sorted_values)
    rank, coverage = _median_rank(n, level)
    if rank < 1:
        return None
    return sorted_values[rank - 1], sorted_values[n - rank], coverage


def _median(sorted_values):
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def timed_runs(run, x, spec):
    """Run ``run(x)`` until the stopping rule holds; return (latencies in ns, stop reason).

    Rule (DESIGN §6 plus a precision target): never stop before ``min_runs`` runs AND
    ``min_seconds`` of timed phase; always stop at ``max_runs`` or ``max_seconds``; in between,
    stop as soon as the distribution-free CI of the median is narrower than ``ci_target`` x p50
    ("ci"), or at once when ``ci_target`` is null ("minimum"). The CI is recomputed every 5 % more
    runs (a sort per check), so checking stays a small fraction of the work and a stop comes at
    most 5 % late. Only ``run(x)`` is inside each timed interval.
    """
    clock = time.perf_counter_ns
    min_runs, max_runs = spec["min_runs"], spec["max_runs"]
    min_ns, max_ns = spec["min_seconds"] * 1e9, spec["max_seconds"] * 1e9
    target, level = spec["ci_target"], spec["ci_level"]
    lat = []
    next_check = 0
    start = clock()
    while True:
        a = clock()
        run(x)
        b = clock()
        lat.append(b - a)
        n = len(lat)
        elapsed = b - start
        if n >= max_runs:
            return lat, "max_runs"
        if elapsed >= max_ns:
            return lat, "max_seconds"
        if n < min_runs or elapsed < min_ns:
            continue
        if target is None:
            return lat, "minimum"
        if n >= next_check:
            s = sorted(lat)
            ci = median_ci(s, level)
            if ci is not None and ci[1] - ci[0] <= target * _median(s):
                return lat, "ci"
            next_check = n + max(1, n // 20)


def latency_summary(lat_ns, level, target):
    """The latency fields of a measure response from per-run times in ns (values in ms)."""
    ms = np.sort(np.asarray(lat_ns, dtype=np.float64) / 1e6)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])  # linear interpolation (numpy's default)
    ci = median_ci(ms.tolist(), level)
    rel = (ci[1] - ci[0]) / p50 if ci is not None and p50 > 0 else None
    return {
        "runs": int(ms.size),
        "latencies_ms": [round(float(v) / 1e6, 6) for v in lat_ns],  # run order, ns resolution
        "p50_ms": _finite(p50), "p90_ms": _finite(p90), "p99_ms": _finite(p99),
        "mean_ms": _finite(ms.mean()),
        "std_ms": _finite(ms.std(ddof=1)) if ms.size > 1 else None,  # sample std
        "min_ms": _finite(ms[0]), "max_ms": _finite(ms[-1]),
        "p50_ci_low_ms": _finite(ci[0]) if ci else None,
        "p50_ci_high_ms": _finite(ci[1]) if ci else None,
        "ci_coverage": _finite(ci[2]) if ci else None,
        "ci_level": level,
        "ci_rel_width": _finite(rel),
        "ci_target": target,
        "ci_met": bool(rel is not None and target is not None and rel <= target),
    }


# ---------------------------------------------------------------------------- system probes


def _read(path, default=None):
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return default


def _read_number(path):
    text = _read(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _strict_number(path):
    """A sysfs number; OSError/ValueError when it cannot be read (a sensor error, not absence)."""
    with open(path) as f:
        return float(f.read().strip())


def _natural(path):
    """Sort key that puts hwmon10 after hwmon9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def cpu_model():
    """The CPU's name from /proc/cpuinfo (x86 'model name', ARM 'Hardware'/'Processor'/part)."""
    info = _read("/proc/cpuinfo", "")
    fields = {}
    for line in info.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    if "CPU implementer" in fields:  # arm64 kernels give only the part numbers
        return "ARM implementer %s part %s" % (fields["CPU implementer"], fields.get("CPU part"))
    return platform.processor() or None


def cpu_affinity():
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def set_affinity(cpus):
    """Pin every thread of this process (BLAS workers included) to ``cpus``.

    ``os.sched_setaffinity(0, ...)`` pins only the calling thread on Linux; OpenBLAS's worker
    threads already exist, so each task of the process is pinned by its thread id.
    """
    cpus = set(cpus)
    os.sched_setaffinity(0, cpus)  # first: raises on a bad set before anything changed
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass  # the thread ended meanwhile


def cpu_freq_state(cpus):
    """{"governor", "freq_mhz", "freq_source"} of ``cpus``: cpufreq, else /proc/cpuinfo's MHz.

    Several governors are joined with ','; the frequency is the mean over ``cpus``. The source
    says which: 'cpuinfo' is the kernel's last-known clock (constant on VMs), None: unreadable.
    """
    governors = set()
    freqs = []
    for c in cpus:
        base = "/sys/devices/system/cpu/cpu%d/cpufreq/" % c
        g = _read(base + "scaling_governor")
        if g:
            governors.add(g)
        f = _read_number(base + "scaling_cur_freq")
        if f is not None:
            freqs.append(f / 1000.0)
    source = "cpufreq" if freqs else None
    if not freqs:
        for line in _read("/proc/cpuinfo", "").splitlines():
            if line.startswith("cpu MHz"):
                try:
                    freqs.append(float(line.split(":", 1)[1]))
                except ValueError:
                    pass
        source = "cpuinfo" if freqs else None
    return {"governor": ",".join(sorted(governors)) or None,
            "freq_mhz": _finite(sum(freqs) / len(freqs), 3) if freqs else None,
            "freq_source": source}


def thermal_zones(path=None):
    """[{"zone", "type", "temp_c"}] under ``path`` (a thermal class dir or one zone's dir)."""
    root = path or THERMAL_ROOT
    if os.path.isfile(os.path.join(root, "temp")):
        dirs = [root]
    else:
        dirs = sorted(glob.glob(os.path.join(root, "thermal_zone*")), key=_natural)
    zones = []
    for d in dirs:
        t = _read_number(os.path.join(d, "temp"))
        if t is not None:  # some zones exist but refuse reads (EINVAL/ENODATA): skip them
            zones.append({"zone": os.path.basename(d), "type": _read(os.path.join(d, "type")),
                          "temp_c": t / 1000.0})
    return zones


def max_temp(path=None):
    """The hottest zone's temperature in °C, or None without thermal zones."""
    zones = thermal_zones(path)
    return max(z["temp_c"] for z in zones) if zones else None


def settle_temperature(thermal):
    """Wait, idle, until the hottest zone varies by <= tolerance over a window (bounded).

    A device still hot from the previous measurement may throttle during this one; waiting
    until the temperature is steady makes consecutive measurements comparable. Returns
    {"settle_s", "settled" (None: no thermal zone or disabled), "temp_c"}.
    """
    t0 = time.monotonic()
    first = max_temp(thermal["path"])
    if first is None or thermal["settle_max_s"] <= 0:
        return {"settle_s": 0.0, "settled": None, "temp_c": first}
    window, poll = thermal["window_s"], min(0.25, thermal["window_s"] / 4.0)
    history = [(t0, first)]
    settled = False
    while True:
        time.sleep(poll)
        now = time.monotonic()
        if now - t0 >= thermal["settle_max_s"]:
            break
        temp = max_temp(thermal["path"])
        if temp is None:
            continue  # a failed read (some zones refuse reads at times): the bound still holds
        history.append((now, temp))
        while len(history) > 2 and history[1][0] <= now - window:
            history.pop(0)
        temps = [v for _, v in history]
        if now - t0 >= window and max(temps) - min(temps) <= thermal["tolerance_c"]:
            settled = True
            break
    return {"settle_s": round(time.monotonic() - t0, 3), "settled": settled,
            "temp_c": history[-1][1]}


# ---------------------------------------------------------------------------- BLAS threads

# (set, get) symbol pairs of BLAS libraries whose thread count can be changed at run time.
_BLAS_SYMBOLS = (
    ("openblas", "scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),  # numpy 2 wheels
    ("openblas", "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas", "openblas_set_num_threads64_", "openblas_get_num_threads64_"),  # numpy 1.x wheels
    ("openblas", "openblas_set_num_threads", "openblas_get_num_threads"),  # distribution OpenBLAS
    ("mkl", "MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("blis", "bli_thread_set_num_threads", "bli_thread_get_num_threads"),
)
_blas_cache = []


def blas_control():
    """{"library", "vendor", "set", "get"} for the BLAS numpy loaded, found in /proc/self/maps.

    ``set``/``get`` are ctypes functions or None. Debian's netlib reference BLAS
    (``.../blas/libblas.so.3``) has no thread control because it is single-threaded.
    """
    if _blas_cache:
        return _blas_cache[0]
    paths = []
    for line in (_read("/proc/self/maps", "") or "").splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6:
            p = parts[5].strip()
            base = os.path.basename(p).lower()
            if ".so" in base and ("blas" in base or "mkl" in base or "blis" in base) and p not in paths:
                paths.append(p)
    found = {"library": paths[0] if paths else None, "vendor": None, "set": None, "get": None}
    for p in paths:
        try:
            lib = ctypes.CDLL(p)  # already mapped: dlopen only returns a handle
        except OSError:
            continue
        for vendor, set_name, get_name in _BLAS_SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setter, getter = getattr(lib, set_name), getattr(lib, get_name)
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                found = {"library": p, "vendor": vendor, "set": setter, "get": getter}
                break
        if found["set"] is not None:
            break
        if "/blas/libblas.so" in p:
            found = {"library": p, "vendor": "reference", "set": None, "get": None}
    _blas_cache.append(found)
    return found


def blas_threads():
    """(threads in effect or None, note)."""
    b = blas_control()
    if b["get"] is not None:
        return int(b["get"]()), "%s reports it" % b["vendor"]
    if b["vendor"] == "reference":
        return 1, "reference BLAS is single-threaded"
    return None, "unknown: no thread control found in BLAS library %s" % b["library"]


def set_blas_threads(n):
    """Ask the BLAS for ``n`` threads; return (threads in effect as it reports them, note)."""
    b = blas_control()
    if b["set"] is None:
        threads, note = blas_threads()
        if threads == n:
            return threads, note  # e.g. 1 asked of the single-threaded reference BLAS
        return threads, "could not set %d threads: %s" % (n, note)
    b["set"](int(n))
    got = int(b["get"]())
    return got, ("%s set to %d" % (b["vendor"], got)) if got == n else (
        "%s refused %d threads, runs with %d" % (b["vendor"], n, got))


# ---------------------------------------------------------------------------- backends


class Backend(object):
    """One runtime for an artifact. ``prepare(x)`` converts the float32 batch once, outside the
    timed runs; ``run(prepared)`` is the timed call; ``numpy_outputs`` gives the outputs as
    arrays. Thread control returns (threads in effect or None, note) and never pretends."""

    name = None
    file_sha256 = None

    def prepare(self, x):
        return x

    def run(self, x):
        raise NotImplementedError

    def numpy_outputs(self, result):
        return list(result) if isinstance(result, tuple) else [result]

    def threads(self):
        return blas_threads()

    def set_threads(self, n):
        return set_blas_threads(n)


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, directory):
        self.model = load_model(directory, verify=False)  # the cache verified the hash already
        self.input_shape = self.model.input_shape

    def run(self, x):
        return self.model.run(x)


def _backend_file(directory, backend):
    path = os.path.join(directory, BACKEND_FILES[backend])
    if not os.path.isfile(path):
        raise AgentError("artifact_missing", "artifact %s has no %s for backend %r: export that "
                         "backend next to it, or measure with backend 'numpy'"
                         % (directory, BACKEND_FILES[backend], backend))
    return path


def _import_backend(module):
    try:
        return __import__(module)  # only here, only when a request asks for this backend
    except Exception as exc:  # ImportError, or a broken install failing on import
        raise AgentError("backend_unavailable", "backend %r cannot be imported on this device "
                         "(%s: %s): install it, or measure with backend 'numpy'"
                         % (module, type(exc).__name__, exc)) from None


def _graph_input_shape(directory):
    with open(os.path.join(directory, "graph.json")) as f:
        return tuple(json.load(f)["input"]["shape"])


class TorchBackend(Backend):
    """A TorchScript file ``model.ts`` next to the artifact, run under ``torch.inference_mode``."""

    name = "torch"

    def __init__(self, directory):
        path = _backend_file(directory, "torch")
        self.torch = _import_backend("torch")
        self.file_sha256 = file_digest(path)
        self.module = self.torch.jit.load(path, map_location="cpu").eval()
        self.input_shape = _graph_input_shape(directory)

    def prepare(self, x):
        return self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def run(self, x):
        with self.torch.inference_mode():
            return self.module(x)

    def numpy_outputs(self, result):
        items = result if isinstance(result, (tuple, list)) else [result]
        return [t.detach().cpu().numpy() for t in items]

    def threads(self):
        return self.torch.get_num_threads(), "torch reports it"

    def set_threads(self, n):
        self.torch.set_num_threads(int(n))
        got = self.torch.get_num_threads()
        return got, "torch intra-op threads set to %d" % got


class OnnxBackend(Backend):
    """``model.onnx`` next to the artifact, on onnxruntime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, directory):
        self.path = _backend_file(directory, "onnxruntime")
        self.ort = _import_backend("onnxruntime")
        self.file_sha256 = file_digest(self.path)
        self.input_shape = _graph_input_shape(directory)
        self._threads = None
        self._open(0)

    def _open(self, n):
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = int(n)  # 0: onnxruntime's default
        self.session = self.ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self._threads = n or None

    def prepare(self, x):
        return {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def run(self, x):
        return self.session.run(None, x)

    def numpy_outputs(self, result):
        return [np.asarray(r) for r in result]

    def threads(self):
        if self._threads is None:
            return None, "onnxruntime default (it cannot report its thread count)"
        return self._threads, "as configured (onnxruntime cannot report it back)"

    def set_threads(self, n):
        if n != self._threads:
            self._open(n)  # intra-op threads are fixed when a session is created
        return self.threads()


BACKEND_CLASSES = {"numpy": NumpyBackend, "torch": TorchBackend, "onnxruntime": OnnxBackend}


def available_backends():
    """Backends whose runtime is installed (found, NOT imported: importing torch takes seconds)."""
    names = ["numpy"]
    versions = {"numpy": np.__version__}
    for name in ("onnxruntime", "torch"):
        if importlib.util.find_spec(name) is not None:
            names.append(name)
            try:
                import importlib.metadata as md  # Python >= 3.8

                versions[name] = md.version(name)
            except Exception:  # metadata missing: the module may still import
                versions[name] = None
    return names, versions


class ModelCache(object):
    """Loaded artifacts by (hash, backend), LRU-bounded: a model is loaded and verified once.

    A cache hit costs a few ``stat`` calls: if any artifact file changed (size, mtime, inode)
    since it was verified, the artifact is hashed and loaded again, so a corrupted or replaced
    file is never measured silently.
    """

    def __init__(self, size=MODEL_CACHE_SIZE):
        self.size = size
        self.entries = collections.OrderedDict()

    @staticmethod
    def _signature(directory, backend):
        names = list(ARTIFACT_FILES) + ([BACKEND_FILES[backend]] if backend in BACKEND_FILES else [])
        sig = []
        for name in names:
            try:
                st = os.stat(os.path.join(directory, name))
                sig.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
            except OSError:
                sig.append((name, None))
        return tuple(sig)

    def get(self, directory, backend, verify=True):
        """(backend instance, manifest, digest, was cached, load ms); raises AgentError."""
        directory = os.path.abspath(os.path.expanduser(directory))
        if not os.path.isdir(directory):
            raise AgentError("artifact_missing", "artifact directory %s does not exist on the "
                             "device: upload it first" % directory)
        missing = [f for f in ARTIFACT_FILES if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise AgentError("artifact_missing", "artifact %s lacks %s: upload it again"
                             % (directory, ", ".join(missing)))
        digest = os.path.basename(directory)
        key = (digest, backend)
        sig = self._signature(directory, backend)
        hit = self.entries.get(key)
        if hit is not None and hit[0] == sig and hit[3] == directory:
            self.entries.move_to_end(key)
            return hit[1], hit[2], digest, True, 0.0
        self.entries.pop(key, None)
        t0 = time.perf_counter()
        try:
            if verify:
                actual = artifact_digest(directory)
                if actual != digest:
                    raise AgentError("artifact_corrupt", "artifact %s is corrupt: its content hashes "
                                     "to %s, not its name; upload it again" % (directory, actual))
            with open(os.path.join(directory, "manifest.json")) as f:
                manifest = json.load(f)
            instance = BACKEND_CLASSES[backend](directory)
        except ArtifactCorrupt as exc:
            raise AgentError("artifact_corrupt", str(exc)) from None
        except (OSError, ValueError, KeyError) as exc:
            raise AgentError("artifact_corrupt", "artifact %s cannot be read (%s: %s); upload it "
                             "again" % (directory, type(exc).__name__, exc)) from None
        self.entries[key] = (sig, instance, manifest, directory)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return instance, manifest, digest, False, (time.perf_counter() - t0) * 1e3


def make_input(input_shape, batch, seed):
    """The measurement input: standard normal float32 (batch, *input_shape) from ``seed``."""
    return np.random.default_rng(seed).standard_normal((batch,) + tuple(input_shape), dtype=np.float32)


# ---------------------------------------------------------------------------- energy sources


class EnergySource(object):
    """A power meter. ``read()`` returns watts (``kind`` "power") or a cumulative counter in
    joules (``kind`` "energy"); it raises OSError/ValueError when the sensor cannot be read.
    ``sim_hint`` is a note when the sensor itself says that it is simulated. ``lag_s`` is how
    long a reading trails the load: a sensor that averages over a window (hwmon's
    ``update_interval``) reports a change only after it; the agent shifts its window by that."""

    source = None
    kind = "power"
    path = None
    sensor = None
    sim_hint = None
    lag_s = 0.0

    def read(self):
        raise NotImplementedError

    def describe(self):
        return {"source": self.source, "path": self.path, "sensor": self.sensor,
                "kind": self.kind, "simulated": self.sim_hint is not None, "lag_s": self.lag_s}


def _sensor_dirs(root, has_sensor):
    """[root] when ``root`` is itself a sensor dir, else its sensor subdirectories, sorted."""
    if not os.path.isdir(root):
        raise ValueError("%s does not exist" % root)
    if has_sensor(root):
        return [root]
    dirs = [os.path.join(root, d) for d in os.listdir(root)]
    return sorted((d for d in dirs if os.path.isdir(d) and has_sensor(d)), key=_natural)


_HWMON_FILE = re.compile(r"^(power|curr|in)(\d+)_(input|average)$")


def _hwmon_channels(directory):
    """{"power": {index: file}, "curr": {index: file}, "in": {index: file}} of a hwmon dir."""
    found = {"power": {}, "curr": {}, "in": {}}
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in sorted(names):
        m = _HWMON_FILE.match(name)
        if m:
            # Prefer *_input (instantaneous) over *_average when a channel has both.
            slot = found[m.group(1)]
            if int(m.group(2)) not in slot or m.group(3) == "input":
                slot[int(m.group(2))] = os.path.join(directory, name)
    return found


class HwmonSource(EnergySource):
    """A hwmon power channel (``powerN_input`` µW) or current x voltage (``currN_input`` mA x
    ``inN_input`` mV, the INA2xx/INA3221 layout where inN is the bus voltage of channel N)."""

    source = "hwmon"

    def __init__(self, directory, channel=None):
        ch = _hwmon_channels(directory)
        name = _read(os.path.join(directory, "name"))
        self.path = directory
        if channel:
            kind, index = re.match(r"^(power|curr)(\d+)$", channel).groups()
            index = int(index)
        elif ch["power"]:
            kind, index = "power", min(ch["power"])
        else:
            pairs = sorted(set(ch["curr"]) & set(ch["in"]))
            if not pairs:
                raise ValueError("hwmon %s (%s) has no power*_input nor curr*_input with in*_input"
                                 % (directory, name))
            kind, index = "curr", pairs[0]
        if kind == "power":
            if index not in ch["power"]:
                raise ValueError("hwmon %s (%s) has no power%d_input" % (directory, name, index))
            self.files = (ch["power"][index],)
            self.sensor = "%s power%d" % (name, index)
        else:
            if index not in ch["curr"] or index not in ch["in"]:
                raise ValueError("hwmon %s (%s) lacks curr%d_input or in%d_input"
                                 % (directory, name, index, index))
            self.files = (ch["curr"][index], ch["in"][index])
            self.sensor = "%s curr%d x in%d" % (name, index, index)
        label = (_read(os.path.join(directory, "%s%d_label" % (kind, index))) or "").lower()
        if name == SIM_HWMON_NAME or os.path.exists(os.path.join(directory, "SIMULATED")) \
                or "simulated" in label:
            self.sim_hint = "hwmon %s says it is simulated" % (name,)
        interval_ms = _read_number(os.path.join(directory, "update_interval"))
        if interval_ms is not None and interval_ms > 0:
            self.lag_s = min(2.0, interval_ms / 1000.0)  # bounded: a bogus value must not stall
        self.read()  # fail now, not during the measurement

    def read(self):
        if len(self.files) == 1:
            return _strict_number(self.files[0]) / 1e6  # µW
        return abs(_strict_number(self.files[0]) * _strict_number(self.files[1])) / 1e6  # mA x mV


def find_hwmon(root, channel=None):
    dirs = _sensor_dirs(root, lambda d: any(_hwmon_channels(d)[k] for k in ("power", "curr")))
    reasons = []
    for d in dirs:
        try:
            return HwmonSource(d, channel)
        except (OSError, ValueError) as exc:
            reasons.append(str(exc))
    raise ValueError("no usable hwmon power sensor under %s%s"
                     % (root, (": " + "; ".join(reasons)) if reasons else ""))


class PowerSupplySource(EnergySource):
    """A power_supply (battery): ``power_now`` µW, or ``current_now`` µA x ``voltage_now`` µV.

    Only meaningful while the device runs from it (status Discharging); ``describe`` says the
    status so that a charging battery is not mistaken for the load."""

    source = "power_supply"

    def __init__(self, directory):
        self.path = directory
        p = os.path.join(directory, "power_now")
        if os.path.isfile(p):
            self.files = (p,)
            self.sensor = "%s power_now" % os.path.basename(directory)
        else:
            self.files = (os.path.join(directory, "current_now"), os.path.join(directory, "voltage_now"))
            self.sensor = "%s current_now x voltage_now" % os.path.basename(directory)
        self.read()

    def read(self):
        if len(self.files) == 1:
            return abs(_strict_number(self.files[0])) / 1e6
        # Drivers sign the current by direction; the magnitude is the load.
        return abs(_strict_number(self.files[0]) * _strict_number(self.files[1])) / 1e12

    def describe(self):
        d = EnergySource.describe(self)
        d["status"] = _read(os.path.join(self.path, "status"))
        return d


def _has_power_supply(d):
    return os.path.isfile(os.path.join(d, "power_now")) or (
        os.path.isfile(os.path.join(d, "current_now")) and os.path.isfile(os.path.join(d, "voltage_now")))


def find_power_supply(root, channel=None):
    reasons = []
    for d in _sensor_dirs(root, _has_power_supply):
        try:
            return PowerSupplySource(d)
        except (OSError, ValueError) as exc:
            reasons.append("%s: %s" % (d, exc))
    raise ValueError("no readable power_supply with power_now or current_now+voltage_now under %s%s"
                     % (root, (": " + "; ".join(reasons)) if reasons else ""))


class RaplSource(EnergySource):
    """Linux powercap (RAPL) ``energy_uj`` counters of the top-level zones, summed.

    A counter wraps at ``max_energy_range_uj``; the source is sampled often enough (at least
    every few seconds) that at most one wrap happens between two reads, and adds the range back.
    """

    source = "rapl"
    kind = "energy"

    def __init__(self, zones):
        self.zones = zones
        self.path = zones[0] if len(zones) == 1 else os.path.dirname(zones[0])
        self.sensor = "+".join(_read(os.path.join(z, "name")) or os.path.basename(z) for z in zones)
        self.ranges = [_read_number(os.path.join(z, "max_energy_range_uj")) for z in zones]
        self.last = [None] * len(zones)
        self.total_uj = 0.0
        self.read()

    def read(self):
        for i, z in enumerate(self.zones):
            raw = _strict_number(os.path.join(z, "energy_uj"))
            if self.last[i] is not None:
                delta = raw - self.last[i]
                if delta < 0 and self.ranges[i]:
                    delta += self.ranges[i]  # the counter wrapped
                self.total_uj += delta
            self.last[i] = raw
        return self.total_uj / 1e6


def find_rapl(root, channel=None):
    if os.path.isfile(os.path.join(root, "energy_uj")):
        zones = [root]
    else:
        if not os.path.isdir(root):
            raise ValueError("%s does not exist" % root)
        # Top-level zones only ("intel-rapl:0", not "intel-rapl:0:1", whose energy is inside
        # its parent's): summing both would count the cores twice.
        zones = sorted((os.path.join(root, d) for d in os.listdir(root)
                        if re.match(r"^[\w-]+:\d+$", d) and os.path.isfile(os.path.join(root, d, "energy_uj"))),
                       key=_natural)
        packages = [z for z in zones if (_read(os.path.join(z, "name")) or "").startswith("package")]
        zones = packages or zones
    if not zones:
        raise ValueError("no powercap zone with energy_uj under %s" % root)
    try:
        return RaplSource(zones)
    except PermissionError:
        raise ValueError("powercap energy_uj under %s is readable by root only (since Linux 5.10):"
                         " run the agent as root or make the file readable" % root) from None


class CommandSource(EnergySource):
    """An external meter: runs ``argv`` per sample and takes the first number on its stdout
    (watts, or cumulative joules with unit "J"; see the protocol comment)."""

    source = "command"
    _NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

    def __init__(self, argv, unit):
        self.argv = list(argv)
        self.kind = "power" if unit == "W" else "energy"
        self.path = None
        self.sensor = " ".join(shlex.quote(a) for a in self.argv)
        self.read()

    def read(self):
        try:
            out = subprocess.run(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, timeout=5.0)
        except subprocess.TimeoutExpired:
            raise OSError("meter command %s took over 5 s" % self.sensor) from None
        if out.returncode != 0:
            raise OSError("meter command %s exited %d: %s" % (
                self.sensor, out.returncode, out.stderr.decode("utf-8", "replace").strip()[-200:]))
        text = out.stdout.decode("utf-8", "replace")
        m = self._NUMBER_RE.search(text)
        if m is None:
            raise ValueError("meter command %s printed no number: %r" % (self.sensor, text[:100]))
        return float(m.group(0))


FINDERS = {"rapl": find_rapl, "hwmon": find_hwmon, "power_supply": find_power_supply}


def open_energy_source(spec):
    """(EnergySource or None, note) for the request's energy settings.

    ``auto`` tries rapl, hwmon, power_supply in that order (a command when one is given) and
    returns (None, why) when none is there. An explicitly named source that is missing or
    unreadable raises AgentError(energy_unavailable) before anything is measured.
    """
    source = spec["source"]
    if source == "none":
        return None, "energy source 'none' requested"
    if source == "command" or (source == "auto" and spec["command"]):
        try:
            return CommandSource(spec["command"], spec["unit"]), None
        except (OSError, ValueError) as exc:
            raise AgentError("energy_unavailable", "energy meter command failed its first reading "
                             "(%s); fix energy.command in the fleet file" % exc) from None
    order = ("rapl", "hwmon", "power_supply") if source == "auto" else (source,)
    reasons = []
    for name in order:
        root = spec["path"] or ENERGY_ROOTS[name]
        try:
            return FINDERS[name](root, spec["channel"]), None
        except (OSError, ValueError) as exc:
            reasons.append("%s: %s" % (name, exc))
    if source == "auto":
        return None, "no energy sensor found (%s)" % "; ".join(reasons)
    raise AgentError("energy_unavailable", "energy source %r is not usable (%s); fix energy.path "
                     "in the fleet file, or use source 'auto' or 'none'" % (source, "; ".join(reasons)))


def list_energy_sources(extra_path=None):
    """describe() of every sensor found at the standard places (and ``extra_path``)."""
    found, notes = [], []
    roots = [(name, ENERGY_ROOTS[name]) for name in ("rapl", "hwmon", "power_supply")]
    if extra_path:
        roots += [(name, extra_path) for name in ("rapl", "hwmon", "power_supply")]
    for name, root in roots:
        if not os.path.isdir(root):
            continue
        try:
            found.append(FINDERS[name](root).describe())
        except (OSError, ValueError) as exc:
            if extra_path and root == extra_path:
                notes.append("%s: %s" % (name, exc))
    return found, notes


class Sampler(threading.Thread):
    """Reads an EnergySource every 1/hz s in a background thread, from start() until stop().

    ``samples`` holds (perf_counter s, value); the first reading is taken at once (``first``
    is set then) and a last one at stop(), so the samples span the whole window. A read error
    stops sampling and is kept in ``error``; the measurement goes on without energy.
    The thread needs the GIL only for a file read per sample (tens of µs).
    """

    def __init__(self, source, hz):
        threading.Thread.__init__(self, name="energy-sampler", daemon=True)
        self.source = source
        self.period = 1.0 / hz
        self.samples = []
        self.error = None
        self.first = threading.Event()
        self._halt = threading.Event()

    def _sample(self):
        a = time.perf_counter()
        value = self.source.read()
        self.samples.append((0.5 * (a + time.perf_counter()), value))

    def run(self):
        try:
            self._sample()
            self.first.set()
            next_t = time.perf_counter()
            while True:
                # Keep the schedule (a sample delayed by the GIL is followed by a prompt one)
                # but never burst to catch up on more than one missed period.
                next_t = max(next_t + self.period, time.perf_counter() - self.period)
                if self._halt.wait(max(0.0, next_t - time.perf_counter())):
                    self._sample()
                    return
                self._sample()
        except Exception as exc:  # a sensor that fails mid-run: report it, keep the latencies
            self.error = "%s: %s" % (type(exc).__name__, exc)
        finally:
            self.first.set()

    def stop(self):
        self._halt.set()
        self.join()


def _clip(samples, start, end):
    """``samples`` restricted to [start, end], with values interpolated at the two ends."""
    def at(t):
        for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
            if t0 <= t <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return None
    start, end = max(start, samples[0][0]), min(end, samples[-1][0])
    if end <= start:
        return []
    inner = [s for s in samples if start < s[0] < end]
    return [(start, at(start))] + inner + [(end, at(end))]


def integrate(samples, kind, start=None, end=None):
    """(joules, seconds) over [start, end] (default: the samples' span): trapezoids of watts,
    or a counter's rise."""
    if len(samples) >= 2 and (start is not None or end is not None):
        samples = _clip(samples, samples[0][0] if start is None else start,
                        samples[-1][0] if end is None else end)
    if len(samples) < 2:
        return None, 0.0
    seconds = samples[-1][0] - samples[0][0]
    if kind == "energy":
        return samples[-1][1] - samples[0][1], seconds
    joules = 0.0
    for (t0, p0), (t1, p1) in zip(samples, samples[1:]):
        joules += (t1 - t0) * 0.5 * (p0 + p1)
    return joules, seconds


def sample_idle(source, hz, seconds):
    """(mean idle power W or None, samples, error) over ``seconds`` with the agent idle.

    Waits ``source.lag_s`` first, so that the sensor's averaging window no longer holds the
    agent's own work (loading the model, the previous request).
    """
    time.sleep(source.lag_s)
    sampler = Sampler(source, hz)
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    if sampler.error:
        return None, len(sampler.samples), sampler.error
    joules, span = integrate(sampler.samples, source.kind)
    if joules is None or span <= 0:
        return None, len(sampler.samples), "too few idle samples"
    return joules / span, len(sampler.samples), None


def estimate_energy_mj(manifest, batch):
    """Energy of one run of ``batch`` samples from operation counts (DESIGN §6 table), in mJ.

    batch x MACs x (MULT 3.7 + ADD 0.9) pJ + params x 640 pJ: every float32 weight is fetched
    from DRAM once per run (the numpy runtime holds weights as float32, also quantised ones);
    activations are assumed on-chip. A rough lower bound, never a measurement. None without
    ``macs``/``params`` in the manifest.
    """
    macs, params = manifest.get("macs"), manifest.get("params")
    if not isinstance(macs, (int, float)) or not isinstance(params, (int, float)):
        return None
    return (batch * macs * (MULT_PJ + ADD_PJ) + params * DRAM_PJ_PER_32BIT) * 1e-9


ESTIMATE_BASIS = ("operation-count estimate, not a measurement: batch x MACs x (3.7 + 0.9) pJ + "
                  "params x 640 pJ (32-bit float MULT, ADD, DRAM access; activations not counted)")


# ---------------------------------------------------------------------------- requests


def energy_result(spec, source, note, idle, sampler, window, runs, estimate_mj):
    """The ``energy`` object of a measure response.

    ``kind``: "measured" (a real sensor), "simulated" (a sensor that is a model: labelled so by
    the request or by the sensor itself) or "estimated" (no usable sensor reading: measured
    energy is null and only the operation-count estimate is given).
    """
    sim_label = spec["simulated"]
    out = {
        "source": source.source if source else None,
        "sensor": source.describe() if source else None,
        "kind": "estimated",
        "simulated": False,
        "simulated_note": None,
        "energy_per_inference_mj": None,
        "net_energy_j": None,
        "samples": 0,
        "sample_hz": spec["sample_hz"],
        "sample_hz_achieved": None,
        "window_s": None,
        "idle_power_w": None,
        "idle_samples": 0,
        "idle_s": spec["idle_s"],
        "active_power_w": None,
        "estimated_energy_per_inference_mj": _finite(estimate_mj),
        "estimate_basis": ESTIMATE_BASIS if estimate_mj is not None else
        "no estimate: manifest.json lacks macs or params",
        "error": None,
        "note": note,
    }
    if source is None:
        return out
    if sim_label or source.sim_hint:
        out["simulated"] = True
        out["simulated_note"] = sim_label if isinstance(sim_label, str) else source.sim_hint or "simulated"
    idle_w, idle_n, idle_err = idle
    out["idle_power_w"] = _finite(idle_w, 6)
    out["idle_samples"] = idle_n
    samples = sampler.samples
    out["samples"] = len(samples)
    if len(samples) > 1 and samples[-1][0] > samples[0][0]:
        out["sample_hz_achieved"] = _finite((len(samples) - 1) / (samples[-1][0] - samples[0][0]), 3)
    # The timed runs' window, shifted by the sensor's lag (see EnergySource.lag_s).
    joules, span = integrate(samples, source.kind, window[0] + source.lag_s, window[1] + source.lag_s)
    if span > 0:
        out["window_s"] = _finite(span, 6)
    if span < 0.5 * (window[1] - window[0]):
        joules = None  # the samples do not cover the runs: no number rather than a wrong one
    error = sampler.error or idle_err
    if error is None and joules is None:
        error = "no samples during the timed runs"
    if error is not None:
        out["error"] = error
        return out
    if idle_w is None:  # idle_s = 0
        out["note"] = "idle_s = 0: gross energy (idle power not measured, not subtracted)"
    net = joules - (idle_w or 0.0) * span
    out["kind"] = "simulated" if out["simulated"] else "measured"
    out["net_energy_j"] = _finite(net)
    out["active_power_w"] = _finite(joules / span, 6)
    out["energy_per_inference_mj"] = _finite(net / runs * 1e3)
    if net <= 0:
        out["note"] = ("active power did not exceed idle power: the run is below this sensor's "
                       "resolution; measure longer (min_seconds) or with a larger batch")
    return out



def compressor_label(compressor):
    """A manifest's ``compressor`` entry as one label: ``deepiot+fixedpoint`` from
    ``{"methods": [...]}`` (``none`` for an empty pipeline: the original), the older
    ``{"method": name}``, or a plain name; None when absent."""
    if isinstance(compressor, dict):
        if isinstance(compressor.get("methods"), list):
            return "+".join(str(m) for m in compressor["methods"]) or "none"
        return compressor.get("method")
    return compressor if isinstance(compressor, str) else None

def measure(req, cache):
    """Measure one artifact's latency distribution (and energy) on this device.

    Order: load (cached by hash) -> threads and affinity -> readings before -> thermal settle
    -> idle power -> warm-up -> timed runs with the energy sampler running -> readings after.
    Response fields, besides ok/op/id/agent_ms: agent_version, protocol, machine, python, numpy,
    artifact, artifact_hash, model_cached, load_ms, backend, backend_file_sha256, batch,
    input_shape, seed, model, compressor (its method), params, macs, weights_bytes (from
    manifest.json), threads_requested, threads
    (in effect, null if unknown), threads_note, blas_library, affinity, warmup, min_runs,
    max_runs, min_seconds, max_seconds, stop_reason (ci | minimum | max_runs | max_seconds),
    timed_s, gc_disabled, runs, latencies_ms (every timed run, in order), p50_ms, p90_ms,
    p99_ms, mean_ms, std_ms, min_ms, max_ms, p50_ci_low_ms, p50_ci_high_ms, ci_level,
    ci_coverage, ci_rel_width, ci_target, ci_met, governor_before/after, freq_before/after_mhz,
    freq_source, temp_before/after_c, thermal (settle result), loadavg_before/after, energy
    (see energy_result), timing_ms {load, settle, idle, warmup, timed, total}, started_at,
    ended_at (ISO 8601 UTC).
    """
    spec = parse_measure(req)
    t_start = time.perf_counter()
    started_at = _utc_now()
    backend, manifest, digest, cached, load_ms = cache.get(spec["artifact"], spec["backend"], spec["verify"])
    source, energy_note = open_energy_source(spec["energy"])
    old_affinity = None
    if spec["cpus"] is not None:
        old_affinity = cpu_affinity()
        try:
            set_affinity(spec["cpus"])
        except (OSError, ValueError, AttributeError) as exc:
            raise AgentError("bad_request", "'cpus' %r cannot be used here (%s); this process may "
                             "run on %s" % (spec["cpus"], exc, old_affinity)) from None
    try:
        if spec["threads"] is None:
            threads, threads_note = backend.threads()
            threads_note = "left as found: " + threads_note
        else:
            threads, threads_note = backend.set_threads(spec["threads"])
        cpus = cpu_affinity()
        thermal_path = spec["thermal"]["path"]
        freq_before = cpu_freq_state(cpus)
        load_before = os.getloadavg()
        t = time.perf_counter()
        settle = settle_temperature(spec["thermal"])
        settle_ms = (time.perf_counter() - t) * 1e3
        temp_before = max_temp(thermal_path)
        t = time.perf_counter()
        idle = (None, 0, None)  # idle_s = 0: the caller asked for gross energy
        if source is not None and spec["energy"]["idle_s"] > 0:
            idle = sample_idle(source, spec["energy"]["sample_hz"], spec["energy"]["idle_s"])
        idle_ms = (time.perf_counter() - t) * 1e3
        x = backend.prepare(make_input(backend.input_shape, spec["batch"], spec["seed"]))
        t = time.perf_counter()
        for _ in range(spec["warmup"]):
            backend.run(x)
        warmup_ms = (time.perf_counter() - t) * 1e3
        sampler = None
        if source is not None:
            sampler = Sampler(source, spec["energy"]["sample_hz"])
            sampler.start()
            sampler.first.wait(10.0)
        gc_was_enabled = gc.isenabled()
        if spec["disable_gc"]:
            # A collection inside a timed run is noise, not the model's cost. No gc.collect()
            # first: with collection off nothing can trigger one, and a full collection costs
            # ~10 ms, more than everything else this request adds to the model's runs.
            gc.disable()
        t_timed = time.perf_counter()
        try:
            lat, reason = timed_runs(backend.run, x, spec)
        finally:
            t_end = time.perf_counter()
            timed_ms = (t_end - t_timed) * 1e3
            if gc_was_enabled:
                gc.enable()
            if sampler is not None:
                time.sleep(source.lag_s)  # the sensor still owes the last runs' readings
                sampler.stop()
        temp_after = max_temp(thermal_path)
        freq_after = cpu_freq_state(cpus)
        load_after = os.getloadavg()
    finally:
        if old_affinity is not None:
            set_affinity(old_affinity)
    runs = len(lat)
    estimate = estimate_energy_mj(manifest, spec["batch"])
    energy = energy_result(spec["energy"], source, energy_note, idle, sampler, (t_timed, t_end), runs,
                           estimate)
    resp = {
        "ok": True,
        "agent_version": AGENT_VERSION,
        "protocol": PROTOCOL_VERSION,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "artifact": os.path.abspath(os.path.expanduser(spec["artifact"])),
        "artifact_hash": digest,
        "model_cached": cached,
        "load_ms": _finite(load_ms, 3),
        "backend": spec["backend"],
        "backend_file_sha256": backend.file_sha256,
        "batch": spec["batch"],
        "input_shape": list(backend.input_shape),
        "seed": spec["seed"],
        "model": manifest.get("model"),
        "compressor": compressor_label(manifest.get("compressor")),
        "params": manifest.get("params"),
        "macs": manifest.get("macs"),
        "weights_bytes": manifest.get("weights_bytes"),
        "threads_requested": spec["threads"],
        "threads": threads,
        "threads_note": threads_note,
        "blas_library": blas_control()["library"] if spec["backend"] == "numpy" else None,
        "affinity": cpus,
        "warmup": spec["warmup"],
        "min_runs": spec["min_runs"],
        "max_runs": spec["max_runs"],
        "min_seconds": spec["min_seconds"],
        "max_seconds": spec["max_seconds"],
        "stop_reason": reason,
        "timed_s": _finite(timed_ms / 1e3, 6),
        "gc_disabled": spec["disable_gc"],
        "governor_before": freq_before["governor"],
        "governor_after": freq_after["governor"],
        "freq_before_mhz": freq_before["freq_mhz"],
        "freq_after_mhz": freq_after["freq_mhz"],
        "freq_source": freq_before["freq_source"],
        "temp_before_c": _finite(temp_before, 3),
        "temp_after_c": _finite(temp_after, 3),
        "thermal": settle,
        "loadavg_before": [round(v, 3) for v in load_before],
        "loadavg_after": [round(v, 3) for v in load_after],
        "energy": energy,
        "started_at": started_at,
        "ended_at": _utc_now(),
    }
    resp.update(latency_summary(lat, spec["ci_level"], spec["ci_target"]))
    resp["timing_ms"] = {
        "load": round(load_ms, 3), "settle": round(settle_ms, 3), "idle": round(idle_ms, 3),
        "warmup": round(warmup_ms, 3), "timed": round(timed_ms, 3),
        "total": round((time.perf_counter() - t_start) * 1e3, 3),
    }
    return resp


INFER_KEYS = ("op", "id", "artifact", "input", "batch", "seed", "backend", "verify")


def infer(req, cache):
    """Run an artifact once on ``input`` (or the measure input of ``batch``/``seed``).

    Response: outputs (nested lists of float32 values as JSON numbers), shapes, artifact_hash.
    """
    _no_unknown(req, INFER_KEYS, "infer: ")
    artifact = _field(req, "artifact", (str,), _REQUIRED, "the artifact directory on the device")
    backend_name = _field(req, "backend", (str,), "numpy", "one of " + ", ".join(BACKENDS),
                          lambda v: v in BACKENDS)
    verify = _field(req, "verify", (bool,), True, "true or false")
    batch = _field(req, "batch", (int,), 1, "an integer >= 1", lambda v: v >= 1)
    seed = _field(req, "seed", (int,), 0, "an integer >= 0", lambda v: v >= 0)
    backend, _, digest, _, _ = cache.get(artifact, backend_name, verify)
    if req.get("input") is None:
        x = make_input(backend.input_shape, batch, seed)
    else:
        try:
            x = np.asarray(req["input"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise AgentError("bad_request", "'input' must be a nested list of numbers (%s)" % exc) from None
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(backend.input_shape):
            raise AgentError("bad_request", "'input' must have shape (batch, %s), but got %s"
                             % (", ".join(map(str, backend.input_shape)), list(x.shape)))
    outs = backend.numpy_outputs(backend.run(backend.prepare(x)))
    return {"ok": True, "artifact_hash": digest, "outputs": [o.tolist() for o in outs],
            "shapes": [list(o.shape) for o in outs]}


def hello(req, cache=None):
    """What this device and agent offer (see the protocol comment for the fields)."""
    _no_unknown(req, ("op", "id", "energy"), "hello: ")
    extra = None
    if req.get("energy") is not None:
        extra = parse_energy(req["energy"])["path"]
    cpus = cpu_affinity()
    freq = cpu_freq_state(cpus)
    sources, notes = list_energy_sources(extra)
    names, versions = available_backends()
    blas = blas_control()
    threads, _ = blas_threads()
    return {
        "ok": True,
        "agent_version": AGENT_VERSION,
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": cpus,
        "governor": freq["governor"],
        "freq_mhz": freq["freq_mhz"],
        "freq_source": freq["freq_source"],
        "thermal_zones": thermal_zones(),
        "energy_sources": sources,
        "energy_notes": notes,
        "backends": names,
        "backend_versions": versions,
        "blas": {"library": blas["library"], "vendor": blas["vendor"], "threads": threads,
                 "settable": blas["set"] is not None},
        "ops": sorted(HANDLERS),
    }


def ping(req, cache=None):
    return {"ok": True}


def bye(req, cache=None):
    return {"ok": True}


HANDLERS = {"hello": hello, "ping": ping, "measure": measure, "infer": infer, "bye": bye}


def handle_line(line, cache):
    """(response dict, whether to exit) for one request line (bytes). Never raises."""
    t0 = time.perf_counter()
    req_id, op = None, None
    try:
        try:
            req = json.loads(line.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError is a ValueError
            raise AgentError("bad_request", "a request must be one JSON object per line (%s), but "
                             "got %r" % (exc, line[:200])) from None
        if not isinstance(req, dict):
            raise AgentError("bad_request", "a request must be a JSON object, but got %r" % (req,))
        req_id, op = req.get("id"), req.get("op")
        handler = HANDLERS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise AgentError("bad_request", "unknown op %r; known ops: %s" % (op, ", ".join(sorted(HANDLERS))))
        resp = handler(req, cache)
    except AgentError as exc:
        resp = {"ok": False, "error": str(exc), "kind": exc.kind}
    except Exception as exc:
        traceback.print_exc()
        resp = {"ok": False, "error": "internal error in the agent: %s: %s (traceback on its "
                "stderr)" % (type(exc).__name__, exc), "kind": "internal"}
    resp["op"] = op
    if req_id is not None:
        resp["id"] = req_id
    resp["agent_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    return resp, bool(resp["ok"] and op == "bye")


def encode(resp):
    """One response line (bytes). A value JSON cannot hold becomes an internal error."""
    try:
        return (json.dumps(resp, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        log("cannot encode a response: %s" % exc)
        fallback = {"ok": False, "kind": "internal", "op": resp.get("op"),
                    "error": "internal error in the agent: response not JSON-encodable (%s)" % exc}
        if "id" in resp:
            fallback["id"] = resp["id"]
        return (json.dumps(fallback) + "\n").encode("utf-8")


def serve(stdin=None, stdout_fd=None):
    """The request loop on stdin/stdout; returns the exit status (0 on bye or end of input)."""
    if stdout_fd is None:
        # Keep the real stdout for the protocol and point fd 1 (and sys.stdout) at stderr, so
        # a print or a C library's message can never interleave with a response line.
        stdout_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    out = os.fdopen(stdout_fd, "wb")
    inp = stdin if stdin is not None else sys.stdin.buffer
    cache = ModelCache()
    log("deepfleet agent %s serving (python %s, numpy %s)"
        % (AGENT_VERSION, platform.python_version(), np.__version__))
    while True:
        line = inp.readline()
        if not line:
            log("end of input: exiting")
            return 0
        if not line.strip():
            continue
        resp, done = handle_line(line, cache)
        try:
            out.write(encode(resp))
            out.flush()
        except BrokenPipeError:
            return 0  # the orchestrator went away: nobody to answer
        if done:
            log("bye")
            return 0


USAGE = """usage: agent.py serve | hello | --version
  serve    answer JSON-line requests on stdin/stdout (see the protocol comment in this file)
  hello    print what this device offers, as JSON
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["serve"]:
        return serve()
    if argv == ["hello"]:
        print(json.dumps(hello({}), indent=1))
        return 0
    if argv == ["--version"]:
        print(AGENT_VERSION)
        return 0
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
