"""The artifact format: what an artifact directory holds, its identity, and its tensor encodings.

A library (Python >= 3.8, standard library + numpy; this module may import nothing else) that
host code and the device program share: the compressors write what it defines, ``artifact.py``
checks with it, and the agent reads with it. It is inlined into the one file shipped to devices
(see ``bundle.py``), so it may not import other deepfleet modules except the device agent's
libraries. The numpy runtime that executes a graph is ``runtime.py``. The human-readable spec is
``docs/artifact-format.md``.

* identity: :func:`digest_of` (the one definition of an artifact's hash), :func:`artifact_digest`
  (of a directory), :func:`file_digest`;
* checks: :func:`check_artifact` raises :class:`ArtifactIncomplete` (files missing) or
  :class:`DigestMismatch` (content does not match the directory's name), both
  :class:`ArtifactCorrupt`;
* weights: :func:`decode_tensor` gives the float32 value of an encoded tensor (:data:`ENCODINGS`);
  :func:`sparse_rows` the nonzeros of a matrix row by row (the ``sparse_linear`` op computes with
  them, never with the dense matrix);
* manifest: :func:`compressor_label` reads a manifest's ``compressor`` entry as one label.
"""

import hashlib
import math
import os

import numpy as np

GRAPH_FORMAT = "deepfleet-graph"
GRAPH_VERSION = 1
ARTIFACT_FILES = ("graph.json", "weights.npz", "manifest.json")
# Files for other runtimes next to the three (DESIGN §5). The artifact hash covers them through
# the manifest, which holds their sha256 (``manifest["onnx"]["sha256"]`` for model.onnx,
# ``manifest["tflite"]["sha256"]`` for model.tflite, LiteRT's flatbuffer at batch 1).
BACKEND_FILES = {"onnxruntime": "model.onnx", "torch": "model.ts", "litert": "model.tflite"}
# The manifest key that declares a backend's file (the file's sha256 is there).
MANIFEST_KEYS = {"onnxruntime": "onnx", "litert": "tflite"}


# ---------------------------------------------------------------------------- identity


def file_digest(path):
    """The hex sha256 of the file at ``path`` (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_of(file_digests):
    """sha256 of an artifact from ``{file name: that file's sha256 hex}`` (the ARTIFACT_FILES):
    over the sorted file names and each file's own sha256. The one definition of the hash, for
    files on disk (:func:`artifact_digest`) and in memory alike."""
    h = hashlib.sha256()
    for name in sorted(ARTIFACT_FILES):
        h.update(name.encode() + b"\0" + file_digests[name].encode() + b"\n")
    return h.hexdigest()


def artifact_digest(directory):
    """sha256 of an artifact directory (see :func:`digest_of`).

    The artifact directory is named by this digest; a mismatch means a corrupt artifact. Raises
    OSError when a file cannot be read (see :func:`check_artifact` for a checked version).
    """
    return digest_of({name: file_digest(os.path.join(directory, name)) for name in ARTIFACT_FILES})


class ArtifactCorrupt(Exception):
    """The artifact's files do not match the hash it is named by, or cannot be read."""


class ArtifactIncomplete(ArtifactCorrupt):
    """The directory lacks some of :data:`ARTIFACT_FILES`; ``missing`` lists them."""

    def __init__(self, directory, missing):
        ArtifactCorrupt.__init__(self, "artifact %s lacks %s: write or copy it again"
                                 % (directory, ", ".join(missing)))
        self.directory = directory
        self.missing = list(missing)

    def __reduce__(self):  # picklable with its fields (Ray re-raises errors in the driver)
        return (type(self), (self.directory, self.missing))


class DigestMismatch(ArtifactCorrupt):
    """The content hashes to ``actual``, not to the directory's name ``expected``."""

    def __init__(self, directory, expected, actual):
        ArtifactCorrupt.__init__(self, "artifact %s is corrupt: its content hashes to %s, not its "
                                 "name %s; write or copy it again" % (directory, actual, expected))
        self.directory = directory
        self.expected = expected
        self.actual = actual

    def __reduce__(self):
        return (type(self), (self.directory, self.expected, self.actual))


def missing_files(directory):
    """The names of :data:`ARTIFACT_FILES` that are not regular files in ``directory``."""
    return [f for f in ARTIFACT_FILES if not os.path.isfile(os.path.join(directory, f))]


def check_artifact(directory, verify=True):
    """The digest of the artifact ``directory`` after checking it; the one artifact check.

    Raises :class:`ArtifactIncomplete` when a file is missing, and with ``verify`` (the
    default) :class:`DigestMismatch` when the content does not hash to the directory's name.
    Without ``verify`` the name is returned unchecked. OSError when a file cannot be read.
    """
    missing = missing_files(directory)
    if missing:
        raise ArtifactIncomplete(directory, missing)
    expected = os.path.basename(os.path.normpath(directory))
    if not verify:
        return expected
    actual = artifact_digest(directory)
    if actual != expected:
        raise DigestMismatch(directory, expected, actual)
    return actual


# ---------------------------------------------------------------------------- tensor decoding


# The weight encodings decode_tensor understands (the tests decode one of each).
ENCODINGS = ("float32", "fixed", "scaled", "codebook", "pq", "rq", "binary", "sparse", "factored")


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
    * ``binary``   ``+scale`` where a bit is 1, ``-scale`` where it is 0 (packed bits);
    * ``sparse``   the nonzeros in row-major order with relative indices (Deep Compression):
      ``values`` is the nested entry of a 1-D tensor of ``nnz`` values (float32, or any
      elementwise encoding), ``index`` ``count`` unsigned codes of ``index_bits`` bits
      (see :func:`_sparse_positions`); every other element is 0;
    * ``factored`` a matrix (rows, cols) as ``codes @ atoms``: ``atoms`` the nested entry of a
      (k, cols) dictionary, ``codes`` of a (rows, k) matrix (usually ``sparse``); row r is the
      sum, in the stored order of its nonzero codes, of code * atom (see :func:`sparse_rows`),
      elementwise float32 operations, so every platform decodes the same bits.

    Nested entries are decoded under the name ``name.role`` (a nested float32 tensor is the
    array ``name.values``, ``name.atoms``, ...). Raises ArtifactCorrupt for an encoding not in
    :data:`ENCODINGS`.
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
    if enc == "sparse":
        out = np.zeros(n, np.float32)
        out[_sparse_positions(spec, arrays)] = decode_tensor(name + ".values", spec["values"], arrays)
        return out.reshape(shape)
    if enc == "factored":
        atoms = decode_tensor(name + ".atoms", spec["atoms"], arrays)  # (k, cols)
        index, values = sparse_rows(name + ".codes", spec["codes"], arrays)  # (rows, m)
        out = np.zeros((index.shape[0], atoms.shape[1]), np.float32)
        for t in range(index.shape[1]):  # in the codes' order: the same sum on every platform
            out += values[:, t:t + 1] * atoms[index[:, t]]
        return out.reshape(shape)
    raise ArtifactCorrupt("weight %r has unknown encoding %r: update the agent" % (name, enc))


def _sparse_positions(spec, arrays):
    """The flat (row-major) positions of a ``sparse`` tensor's stored values, ascending.

    Relative indices: starting before position 0, a code c >= 1 moves c positions on and stores
    the next value there; a code 0 moves 2^index_bits - 1 positions on and stores nothing (a gap
    longer than a code can say). So a gap of g costs (g - 1) // (2^b - 1) + 1 codes.
    """
    codes = _ints(spec, arrays, "index", count=int(spec["count"]), signed=False)
    skip = codes == 0
    steps = np.where(skip, (1 << int(spec["index_bits"])) - 1, codes)
    return (np.cumsum(steps) - 1)[~skip]


def sparse_rows(name, spec, arrays):
    """A matrix's nonzeros row by row: ``(index, values)``, both (rows, m), m the most nonzeros
    of any row (at least 1); row r's nonzeros are ``values[r, t]`` at columns ``index[r, t]``,
    in ascending column order, padded with column 0 and value 0.

    Reads the positions of a ``sparse`` entry directly (never the dense matrix); any other
    encoding is decoded and its nonzeros taken. Raises ArtifactCorrupt for a tensor that is not
    2-D or an unknown encoding.
    """
    shape = [int(d) for d in spec.get("shape", np.shape(arrays.get(name, ())))]
    if len(shape) != 2:
        raise ArtifactCorrupt("weight %r: a row-sparse matrix must be 2-D, not of shape %s" % (name, shape))
    rows, cols = shape
    if spec.get("encoding") == "sparse":
        pos = _sparse_positions(spec, arrays)
        vals = decode_tensor(name + ".values", spec["values"], arrays)
    else:
        flat = decode_tensor(name, spec, arrays).reshape(-1)
        pos = np.flatnonzero(flat)
        vals = flat[pos]
    row = pos // max(cols, 1)
    counts = np.bincount(row, minlength=rows)
    width = max(1, int(counts.max()) if counts.size else 1)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(pos.size) - starts[row]  # rank of each nonzero within its row
    index = np.zeros((rows, width), np.int64)
    values = np.zeros((rows, width), np.float32)
    index[row, slot] = pos - row * cols
    values[row, slot] = vals
    return index, values


# ---------------------------------------------------------------------------- manifest


def compressor_label(compressor):
    """A manifest's ``compressor`` entry as one label: ``deepiot+fixedpoint`` from
    ``{"methods": [...]}`` (``none`` for an empty pipeline: the original), the older
    ``{"method": name}``, or a plain name; None when absent."""
    if isinstance(compressor, dict):
        if isinstance(compressor.get("methods"), list):
            return "+".join(str(m) for m in compressor["methods"]) or "none"
        return compressor.get("method")
    return compressor if isinstance(compressor, str) else None
