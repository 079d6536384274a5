"""Part of the device program: the runtimes an artifact can be measured in, and the cache of
loaded artifacts.

Python >= 3.8, standard library + numpy + the agent's libraries; inlined into the one file
shipped to devices (see ``bundle.py``). Host code does not import it. onnxruntime and torch are
optional: they are imported only through :func:`_import_backend`, and only when a request asks
for them, so a device without them still serves numpy requests.
"""

import abc
import collections
import importlib.util
import json
import os
import time

import numpy as np

from deepfleet.device_agent.format import (
    ARTIFACT_FILES,
    BACKEND_FILES,
    ArtifactCorrupt,
    ArtifactIncomplete,
    DigestMismatch,
    check_artifact,
    file_digest,
)
from deepfleet.device_agent.protocol import AgentError
from deepfleet.device_agent.runtime import load_model
from deepfleet.device_agent.system import blas_threads, set_blas_threads

MODEL_CACHE_SIZE = 4  # models kept loaded: enough to alternate A/B, bounded for 512 MB boards


class Backend(abc.ABC):
    """One runtime for an artifact: the plug-in point for runtimes (numpy, onnxruntime, torch).

    ``Backend(directory)`` loads the artifact in ``directory`` (whose hash the caller checked)
    for this runtime. It raises AgentError ``artifact_missing`` when the runtime's own file is
    not next to the artifact, ``backend_unavailable`` when the runtime cannot be imported, and
    ArtifactCorrupt, OSError or ValueError when a file cannot be read. Then:

    * ``name`` is the runtime (one of ``protocol.BACKENDS``), ``input_shape`` one sample's shape,
      ``file_sha256`` the sha256 of the runtime's own file (None when the artifact hash covers
      what it runs);
    * ``prepare(x)`` converts a float32 batch (B, *input_shape) once, outside the timed runs;
    * ``run(prepared)`` is the timed call;
    * ``numpy_outputs(result)`` gives ``run``'s outputs as a list of float32 arrays, in the
      graph's output order, equal to the numpy runtime's within float tolerance;
    * ``threads()`` and ``set_threads(n)`` return (threads in effect or None, note): a runtime
      that cannot report its threads says so in the note and never pretends.
    """

    name = None
    file_sha256 = None
    input_shape = None

    def prepare(self, x):
        return x

    @abc.abstractmethod
    def run(self, prepared):
        """One inference on a prepared batch; the result goes to :meth:`numpy_outputs`."""

    def numpy_outputs(self, result):
        items = result if isinstance(result, (tuple, list)) else [result]
        return [np.asarray(r) for r in items]

    @abc.abstractmethod
    def threads(self):
        """(threads in effect or None, note)."""

    @abc.abstractmethod
    def set_threads(self, n):
        """Ask for ``n`` intra-op threads; (threads in effect or None, note)."""


class NumpyBackend(Backend):
    name = "numpy"

    def __init__(self, directory):
        self.model = load_model(directory, verify=False)  # the cache verified the hash already
        self.input_shape = self.model.input_shape

    def run(self, prepared):
        return self.model.run(prepared)

    def threads(self):
        return blas_threads()

    def set_threads(self, n):
        return set_blas_threads(n)


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

    def run(self, prepared):
        with self.torch.inference_mode():
            return self.module(prepared)

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
        with open(os.path.join(directory, "manifest.json")) as f:
            expected = (json.load(f).get("onnx") or {}).get("sha256")
        if expected is not None and expected != self.file_sha256:  # the artifact hash covers it
            raise ArtifactCorrupt("artifact %s: its %s does not match the sha256 in its manifest; "
                                  "upload it again" % (directory, BACKEND_FILES["onnxruntime"]))
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

    def run(self, prepared):
        return self.session.run(None, prepared)

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


class ModelCache:
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
        try:
            digest = check_artifact(directory, verify=False)  # all files there; the name
        except ArtifactIncomplete as exc:
            raise AgentError("artifact_missing", "artifact %s lacks %s: upload it again"
                             % (directory, ", ".join(exc.missing))) from None
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
                check_artifact(directory)
            with open(os.path.join(directory, "manifest.json")) as f:
                manifest = json.load(f)
            instance = BACKEND_CLASSES[backend](directory)
        except DigestMismatch as exc:
            raise AgentError("artifact_corrupt", "artifact %s is corrupt: its content hashes to %s, "
                             "not its name; upload it again" % (directory, exc.actual)) from None
        except ArtifactIncomplete as exc:  # a file went away since the check above
            raise AgentError("artifact_missing", "artifact %s lacks %s: upload it again"
                             % (directory, ", ".join(exc.missing))) from None
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

