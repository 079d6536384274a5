"""Part of the device program: the runtimes an artifact can be measured in, which one a request
gets (:func:`choose_backend`: ``auto`` walks the device's preference), and the cache of loaded
artifacts.

Python >= 3.8, standard library + numpy + the agent's libraries; inlined into the one file
shipped to devices (see ``bundle.py``). Host code does not import it. onnxruntime, torch and
LiteRT are optional: they are imported only through :func:`import_runtime`, and only when a
request asks for them (or ``auto`` picks them), so a device without them still serves numpy
requests.
"""

import abc
import collections
import importlib.util
import json
import os
import re
import time

import numpy as np

from deepfleet.device_agent.format import (
    ARTIFACT_FILES,
    BACKEND_FILES,
    MANIFEST_KEYS,
    ArtifactCorrupt,
    ArtifactIncomplete,
    DigestMismatch,
    check_artifact,
    file_digest,
)
from deepfleet.device_agent.protocol import AgentError
from deepfleet.device_agent.runtime import load_model
from deepfleet.device_agent.system import blas_control, blas_threads, set_blas_threads

MODEL_CACHE_SIZE = 4  # models kept loaded: enough to alternate A/B, bounded for 512 MB boards
# LiteRT's Python interpreters, in order of preference, with their distributions: ai-edge-litert
# (x86_64, aarch64 with glibc >= 2.27) and the last standalone runtime, tflite-runtime (2.14 has
# armv7l wheels for glibc >= 2.34 and needs numpy < 2; 2.13 for glibc >= 2.17).
LITERT_MODULES = (("ai_edge_litert.interpreter", "ai-edge-litert"),
                  ("tflite_runtime.interpreter", "tflite-runtime"))
LITERT_FIX = ("install ai-edge-litert (x86_64, aarch64: pip install ai-edge-litert) or tflite-runtime "
              "(armv7l: pip install 'tflite-runtime==2.14.*' 'numpy<2')")


class Backend(abc.ABC):
    """One runtime for an artifact: the plug-in point for runtimes (numpy, onnxruntime, torch).

    ``Backend(directory, threads=None)`` loads the artifact in ``directory`` (whose hash the
    caller checked) for this runtime, with ``threads`` intra-op threads where the runtime fixes
    them when it loads (None: its default). It raises AgentError ``artifact_missing`` when the
    runtime's own file is not next to the artifact, ``backend_unavailable`` when the runtime
    cannot be imported, and ArtifactCorrupt (a file that does not match the manifest), OSError or
    ValueError when a file cannot be read. Then:

    * ``name`` is the runtime (one of ``protocol.BACKENDS``), ``version`` its version,
      ``provider`` what executes the graph inside it (onnxruntime's execution provider, e.g.
      ``CPUExecutionProvider``; ``cpu`` and the BLAS for numpy), ``input_shape`` one sample's
      shape, ``file_sha256`` the sha256 of the runtime's own file (None when the artifact hash
      covers what it runs), ``init_ms`` the time the runtime took to build its model from the
      files (reading, decoding, session creation; not deepfleet's hash checks);
    * ``prepare(x)`` converts a float32 batch (B, *input_shape) once, outside the timed runs;
    * ``run(prepared)`` is the timed call;
    * ``numpy_outputs(result)`` gives ``run``'s outputs as a list of float32 arrays, in the
      graph's output order, equal to the numpy runtime's within float tolerance;
    * ``threads()`` and ``set_threads(n)`` return (threads in effect or None, note): a runtime
      that cannot report its threads says so in the note and never pretends;
    * ``batch_note(batch)`` says how a batch runs when that is not one call of the runtime
      (None otherwise): it goes into the response's backend_note.
    """

    name = None
    version = None
    provider = None
    file_sha256 = None
    input_shape = None
    init_ms = None

    def prepare(self, x):
        return x

    @abc.abstractmethod
    def run(self, prepared):
        """One inference on a prepared batch; the result goes to :meth:`numpy_outputs`."""

    def numpy_outputs(self, result):
        items = result if isinstance(result, (tuple, list)) else [result]
        return [np.asarray(r) for r in items]

    def batch_note(self, batch):
        return None

    @abc.abstractmethod
    def threads(self):
        """(threads in effect or None, note)."""

    @abc.abstractmethod
    def set_threads(self, n):
        """Ask for ``n`` intra-op threads; (threads in effect or None, note)."""


class NumpyBackend(Backend):
    name = "numpy"
    version = np.__version__

    def __init__(self, directory, threads=None):
        t0 = time.perf_counter()
        self.model = load_model(directory, verify=False)  # the cache verified the hash already
        self.init_ms = (time.perf_counter() - t0) * 1e3
        self.input_shape = self.model.input_shape
        blas = blas_control()  # BLAS threads are process-wide: set by set_threads, not here
        self.provider = "cpu (BLAS: %s)" % (blas["vendor"] or os.path.basename(blas["library"] or "")
                                            or "unknown")

    def run(self, prepared):
        return self.model.run(prepared)

    def threads(self):
        return blas_threads()

    def set_threads(self, n):
        return set_blas_threads(n)


def _backend_file(directory, backend):
    path = os.path.join(directory, BACKEND_FILES[backend])
    if not os.path.isfile(path):
        raise AgentError("artifact_missing", "artifact %s has no %s (%s) for backend %r: upload it "
                         "again (an artifact exported before %s existed needs exporting again), or "
                         "measure with backend 'numpy'"
                         % (directory, BACKEND_FILES[backend], path, backend, BACKEND_FILES[backend]))
    return path


def _import_backend(module, backend=None, fix=None):
    """The runtime ``module`` (a dotted name gives the submodule itself), imported only here and
    only when a request asks for its backend; AgentError ``backend_unavailable`` naming the fix
    (default: pip install the module) when it cannot be imported."""
    try:
        return __import__(module, fromlist=["__name__"])
    except Exception as exc:  # ImportError, or a broken install failing on import
        raise AgentError("backend_unavailable", "backend %r cannot be imported on this device "
                         "(%s: %s): %s, or measure with backend 'numpy' (or 'auto')"
                         % (backend or module, type(exc).__name__, exc,
                            fix or "install %s on the device (e.g. pip install %s)" % (module, module))
                         ) from None


def import_litert():
    """(interpreter module, its distribution's name and version): the first of
    :data:`LITERT_MODULES` that imports; AgentError ``backend_unavailable`` when none does."""
    # Constant names: the import rules (tests/test_import_rules.py) list every optional runtime.
    try:
        return _import_backend("ai_edge_litert.interpreter"), "ai-edge-litert", _dist_version("ai-edge-litert")
    except AgentError:  # e.g. an armv7l board: only tflite-runtime exists there
        pass
    fix = ("ai_edge_litert.interpreter does not import either; %s on the device (or measure with "
           "backend 'onnxruntime' where it is installed)" % LITERT_FIX)
    return (_import_backend("tflite_runtime.interpreter", "litert", fix), "tflite-runtime",
            _dist_version("tflite-runtime"))


def import_runtime(name):
    """The runtime module of backend ``name`` (imported now if it was not); AgentError
    ``backend_unavailable`` when it cannot be imported."""
    if name == "onnxruntime":
        return _import_backend("onnxruntime")
    if name == "torch":
        return _import_backend("torch")
    if name == "litert":
        return import_litert()[0]
    return np


def _dist_version(dist):
    try:
        import importlib.metadata as md  # Python >= 3.8

        return md.version(dist)
    except Exception:  # metadata missing: the module may still import
        return None


def _module_version(module):
    return getattr(module, "__version__", None)


def _graph_input_shape(directory):
    with open(os.path.join(directory, "graph.json")) as f:
        return tuple(json.load(f)["input"]["shape"])


class TorchBackend(Backend):
    """A TorchScript file ``model.ts`` next to the artifact, run under ``torch.inference_mode``."""

    name = "torch"
    provider = "cpu"

    def __init__(self, directory, threads=None):
        path = _backend_file(directory, "torch")
        self.torch = _import_backend("torch")
        self.version = _module_version(self.torch)
        self.file_sha256 = file_digest(path)
        if threads is not None:
            self.torch.set_num_threads(int(threads))
        t0 = time.perf_counter()
        self.module = self.torch.jit.load(path, map_location="cpu").eval()
        self.init_ms = (time.perf_counter() - t0) * 1e3
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

    def __init__(self, directory, threads=None):
        self.path = _backend_file(directory, "onnxruntime")
        self.ort = _import_backend("onnxruntime")
        self.version = _module_version(self.ort)
        self.file_sha256 = file_digest(self.path)
        _check_declared(directory, self.name, self.path, self.file_sha256)
        self.input_shape = _graph_input_shape(directory)
        self._threads = None
        t0 = time.perf_counter()
        self._open(threads or 0)
        self.init_ms = (time.perf_counter() - t0) * 1e3

    def _open(self, n):
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads = int(n)  # 0: onnxruntime's default
        self.session = self.ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]
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


def _check_declared(directory, backend, path, sha256):
    """ArtifactCorrupt when the manifest declares the backend's file with another sha256 (the
    artifact hash covers a declared file through the manifest)."""
    with open(os.path.join(directory, "manifest.json")) as f:
        expected = (json.load(f).get(MANIFEST_KEYS[backend]) or {}).get("sha256")
    if expected is not None and expected != sha256:
        raise ArtifactCorrupt("artifact %s is corrupt: its %s (%s) hashes to %s, not the sha256 "
                              "in its manifest; upload it again"
                              % (directory, BACKEND_FILES[backend], path, sha256[:12] + "..."))


def _output_order(details):
    """LiteRT's output details in the model's output order: litert-torch names them
    ``serving_default_output_<i>_output``; other names keep the interpreter's order."""
    def key(item):
        found = re.search(r"output_(\d+)", item[1].get("name", ""))
        return (int(found.group(1)) if found else -1, item[0])
    return [d["index"] for _, d in sorted(enumerate(details), key=key)]


class LiteRTBackend(Backend):
    """``model.tflite`` next to the artifact on LiteRT's interpreter (ai_edge_litert's, else
    tflite_runtime's; ``provider`` names the module, ``version`` its distribution's version).

    The file has batch 1 (``deepfleet._litert``): a batch of B runs as B invocations, one sample
    each, and ``batch_note`` says so. Resizing the input to B was measured and refused: on
    litert-torch 0.10 files XNNPACK fails to reshape, and without XNNPACK recurrent models keep
    a batch-1 output (wrong results, no error). One thread unless the request asks for more
    (LiteRT's own default is implementation-chosen), fixed when the interpreter is built.
    """

    name = "litert"

    def __init__(self, directory, threads=None):
        self.path = _backend_file(directory, "litert")
        self.module, dist, self.version = import_litert()
        self.provider = self.module.__name__ + " (CPU)"
        self.file_sha256 = file_digest(self.path)
        _check_declared(directory, self.name, self.path, self.file_sha256)
        self.input_shape = _graph_input_shape(directory)
        t0 = time.perf_counter()
        self._open(1 if threads is None else int(threads))
        self.init_ms = (time.perf_counter() - t0) * 1e3

    def _open(self, n):
        try:
            interpreter = self.module.Interpreter(model_path=self.path, num_threads=n)
            interpreter.allocate_tensors()
            details = interpreter.get_input_details()
        except Exception as exc:  # ValueError (not a flatbuffer) or RuntimeError (bad model)
            raise ArtifactCorrupt("artifact %s is corrupt: its %s (%s) cannot be loaded by LiteRT "
                                  "(%s: %s); upload it again"
                                  % (os.path.dirname(self.path), BACKEND_FILES["litert"], self.path,
                                     type(exc).__name__, exc)) from None
        shape = tuple(int(v) for v in details[0]["shape"])
        if len(details) != 1 or shape != (1,) + tuple(self.input_shape):
            raise ArtifactCorrupt("artifact %s is corrupt: its %s (%s) takes %s, not one input of "
                                  "shape %s; export it again"
                                  % (os.path.dirname(self.path), BACKEND_FILES["litert"], self.path,
                                     [list(d["shape"]) for d in details],
                                     [1] + list(self.input_shape)))
        self.interpreter = interpreter
        self.input_index = details[0]["index"]
        self.output_indices = _output_order(interpreter.get_output_details())
        self._threads = n

    def prepare(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        return [x[i:i + 1] for i in range(len(x))]  # contiguous one-sample views, no copy

    def run(self, prepared):
        it = self.interpreter
        rows = []
        for sample in prepared:
            it.set_tensor(self.input_index, sample)
            it.invoke()
            rows.append([it.get_tensor(o) for o in self.output_indices])  # copies
        return rows

    def numpy_outputs(self, result):
        return [np.concatenate([row[k] for row in result]) for k in range(len(self.output_indices))]

    def batch_note(self, batch):
        if batch == 1:
            return None
        return ("litert: model.tflite has batch 1; the batch of %d runs as %d invocations of one "
                "sample (latency is for the whole batch)" % (batch, batch))

    def threads(self):
        return self._threads, "as configured (LiteRT cannot report it back)"

    def set_threads(self, n):
        if n != self._threads:
            self._open(int(n))  # LiteRT fixes its threads when the interpreter is built
        return self.threads()


BACKEND_CLASSES = {"numpy": NumpyBackend, "torch": TorchBackend, "onnxruntime": OnnxBackend,
                   "litert": LiteRTBackend}


def _module_installed(name):
    """True when top-level module ``name`` is found (not imported)."""
    return importlib.util.find_spec(name) is not None


def installed(name):
    """True when backend ``name``'s runtime is installed (found, not imported)."""
    if name == "litert":
        return any(_module_installed(m.split(".")[0]) for m, _ in LITERT_MODULES)
    return name == "numpy" or _module_installed(name)


def artifact_has(directory, manifest, name):
    """True when the artifact offers backend ``name``: numpy always (its three files); another
    runtime when its file is there or the manifest declares it (``manifest["onnx"]`` for
    model.onnx, ``manifest["tflite"]`` for model.tflite: then a missing file is a damaged
    upload, reported when it is loaded)."""
    if name == "numpy":
        return True
    if name in MANIFEST_KEYS and manifest.get(MANIFEST_KEYS[name]):
        return True
    return os.path.isfile(os.path.join(directory, BACKEND_FILES[name]))


def choose_backend(requested, preference, directory, manifest):
    """(backend name, note) for a request: ``requested`` itself (its runtime imported now:
    AgentError ``backend_unavailable`` when it cannot be), or for ``"auto"`` the first of
    ``preference`` that is installed on this device, whose file the artifact has, and that
    imports; the note then says what was passed over and why (None when the first was taken).
    The runtime is imported here, before the model is loaded, so that the library's own memory
    is not counted as the model's. AgentError ``backend_unavailable`` when nothing fits."""
    if requested != "auto":
        import_runtime(requested)
        return requested, None
    passed = []
    for name in preference:
        if not installed(name):
            passed.append("%s not installed on this device" % name)
            continue
        if not artifact_has(directory, manifest, name):
            passed.append("the artifact has no %s for %s" % (BACKEND_FILES[name], name))
            continue
        try:
            import_runtime(name)
        except AgentError as exc:
            passed.append("%s does not import (%s)" % (name, exc))
            continue
        return name, ("auto: %s; %s" % ("; ".join(passed), name)) if passed else None
    raise AgentError("backend_unavailable", "backend 'auto': none of the device's backends (%s) "
                     "can measure artifact %s here: %s; put numpy (always installed) in the "
                     "device's backends, or install one of them"
                     % (", ".join(preference), directory, "; ".join(passed)))


def available_backends():
    """Backends whose runtime is installed (found, NOT imported: importing torch takes seconds)."""
    names = ["numpy"]
    versions = {"numpy": np.__version__}
    for name in ("onnxruntime", "torch"):
        if _module_installed(name):
            names.append(name)
            versions[name] = _dist_version(name)
    for module, dist in LITERT_MODULES:  # the interpreter "litert" would import
        if _module_installed(module.split(".")[0]):
            names.append("litert")
            versions["litert"] = _dist_version(dist)
            break
    return names, versions


class ModelCache:
    """Loaded artifacts by (hash, backend), LRU-bounded, and which artifacts' hashes were checked.

    :meth:`open` checks an artifact directory: every file there and (``verify``) its content
    against its name, hashed only when a file changed (size, mtime, inode) since the last check,
    so a corrupted or replaced file is never measured silently and an unchanged one costs a few
    ``stat`` calls. :meth:`cached` gives a loaded instance whose files are unchanged since it was
    loaded, :meth:`load` loads a fresh one (kept in place of the old), :meth:`drop` forgets one.
    """

    def __init__(self, size=MODEL_CACHE_SIZE):
        self.size = size
        self.entries = collections.OrderedDict()  # (digest, backend) -> (signature, instance, dir)
        self.checked = collections.OrderedDict()  # directory -> signature when its hash was checked

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

    def open(self, directory, verify=True):
        """{"directory" (absolute), "digest", "manifest", "verify_ms"} of the artifact in
        ``directory``; AgentError ``artifact_missing`` (no directory, a file missing) or
        ``artifact_corrupt`` (content not matching the name, unreadable manifest)."""
        directory = os.path.abspath(os.path.expanduser(directory))
        if not os.path.isdir(directory):
            raise AgentError("artifact_missing", "artifact directory %s does not exist on the "
                             "device: upload it first" % directory)
        t0 = time.perf_counter()
        try:
            digest = check_artifact(directory, verify=False)  # all files there; the name
            sig = self._signature(directory, None)
            if verify and self.checked.get(directory) != sig:
                check_artifact(directory)
                self.checked[directory] = sig
                self.checked.move_to_end(directory)
                while len(self.checked) > 64 * self.size:
                    self.checked.popitem(last=False)
            with open(os.path.join(directory, "manifest.json")) as f:
                manifest = json.load(f)
            if not isinstance(manifest, dict):
                raise ValueError("manifest.json holds %s, not an object" % type(manifest).__name__)
        except ArtifactIncomplete as exc:
            raise AgentError("artifact_missing", "artifact %s lacks %s: upload it again"
                             % (directory, ", ".join(exc.missing))) from None
        except DigestMismatch as exc:
            raise AgentError("artifact_corrupt", "artifact %s is corrupt: its content hashes to %s, "
                             "not its name; upload it again" % (directory, exc.actual)) from None
        except (OSError, ValueError) as exc:
            raise AgentError("artifact_corrupt", "artifact %s cannot be read (%s: %s); upload it "
                             "again" % (directory, type(exc).__name__, exc)) from None
        return {"directory": directory, "digest": digest, "manifest": manifest,
                "verify_ms": (time.perf_counter() - t0) * 1e3}

    def cached(self, opened, backend):
        """The loaded instance of ``opened`` for ``backend`` if its files are unchanged since
        it was loaded, else None."""
        key = (opened["digest"], backend)
        hit = self.entries.get(key)
        if hit is None or hit[2] != opened["directory"] or hit[0] != self._signature(hit[2], backend):
            return None
        self.entries.move_to_end(key)
        return hit[1]

    def drop(self, opened, backend):
        """Forget the loaded instance of ``opened`` for ``backend`` (if any)."""
        self.entries.pop((opened["digest"], backend), None)

    def load(self, opened, backend, threads=None):
        """A freshly loaded instance of ``opened`` for ``backend`` (see :class:`Backend`), kept
        in the cache in place of an older one; AgentError ``artifact_missing`` /
        ``artifact_corrupt`` (naming the file) / ``backend_unavailable``."""
        directory = opened["directory"]
        sig = self._signature(directory, backend)
        try:
            instance = BACKEND_CLASSES[backend](directory, threads)
        except ArtifactIncomplete as exc:  # a file went away since it was opened
            raise AgentError("artifact_missing", "artifact %s lacks %s: upload it again"
                             % (directory, ", ".join(exc.missing))) from None
        except ArtifactCorrupt as exc:
            raise AgentError("artifact_corrupt", str(exc)) from None
        except (OSError, ValueError, KeyError) as exc:
            raise AgentError("artifact_corrupt", "artifact %s cannot be loaded for %s (%s: %s); "
                             "upload it again" % (directory, backend, type(exc).__name__, exc)) from None
        key = (opened["digest"], backend)
        self.entries.pop(key, None)
        self.entries[key] = (sig, instance, directory)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return instance

    def get(self, directory, backend, verify=True):
        """(instance, manifest, digest, was cached, load ms): a cached instance when its files
        are unchanged, else a fresh one; raises AgentError as :meth:`open` and :meth:`load`."""
        opened = self.open(directory, verify)
        instance = self.cached(opened, backend)
        if instance is not None:
            return instance, opened["manifest"], opened["digest"], True, 0.0
        t0 = time.perf_counter()
        import_runtime(backend)
        instance = self.load(opened, backend)
        load_ms = opened["verify_ms"] + (time.perf_counter() - t0) * 1e3
        return instance, opened["manifest"], opened["digest"], False, load_ms


def make_input(input_shape, batch, seed):
    """The measurement input: standard normal float32 (batch, *input_shape) from ``seed``."""
    return np.random.default_rng(seed).standard_normal((batch,) + tuple(input_shape), dtype=np.float32)

