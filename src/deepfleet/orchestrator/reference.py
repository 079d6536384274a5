"""The reference model: a fixed artifact re-measured now and then to see a device drift.

A device's speed changes under us (another tenant, heat, a governor, a background job). Every
few measurements the driver measures the same small model again; its p50 relative to the
device's first reference p50 of the run is the *drift* recorded on every row (see
:class:`ReferenceTracker`), so a reader can tell "this candidate is slower" from "the device
got slower".

The model is a 64-128-128-10 ReLU MLP whose weights are small integers over 1000 computed from
their indices: no random generator and no floating-point library call is involved, so every
machine and every numpy version builds byte-identical files and the same artifact hash
(:data:`REFERENCE_DIGEST`, checked by a test; its model.onnx, built field by field, is covered
too, so the ONNX conversion changing changes the hash). It is built once and cached.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from deepfleet._files import cache_dir
from deepfleet.artifact import Artifact, open_artifact, write_artifact
from deepfleet.device_agent.format import GRAPH_FORMAT, GRAPH_VERSION
from deepfleet.errors import ArtifactError

__all__ = ["REFERENCE_BACKENDS", "REFERENCE_DIGEST", "REFERENCE_REQUEST", "ReferenceTracker",
           "reference_artifact"]

_SIZES = (64, 128, 128, 10)
_VERSION = 1  # bump when the model changes: old and new reference p50s are not comparable

#: The artifact hash every build must give (a different one means the recipe changed).
REFERENCE_DIGEST = "118cc0b2b2c73b9f8ac58ef5d9bca0f637ae637763a2d55a2d7324b01588e254"

#: Agent ``measure`` fields for the reference: short (it is overhead) but long enough for the
#: CI-of-the-median rule to settle on a ~50 µs model; no energy (drift is about time); the
#: cached model when the agent has it (drift is about the runs, not about loading).
REFERENCE_REQUEST: dict[str, Any] = {
    "warmup": 20, "min_runs": 50, "min_seconds": 0.3, "max_seconds": 3.0, "ci_target": 0.02,
    "batch": 1, "energy": {"source": "none"}, "fresh": False,
}


#: The runtimes the reference artifact has files for (graph.json: numpy; model.onnx:
#: onnxruntime). Its hash is fixed, so it never gains a TorchScript or LiteRT file: a run
#: measuring candidates in another runtime measures the reference in the device's own choice
#: (backend auto), the same at every reference of the run, which is what drift compares.
REFERENCE_BACKENDS = ("numpy", "onnxruntime")


def _weights(rows: int, cols: int, salt: int) -> np.ndarray:
    """A (rows, cols) float32 matrix of exact values k / 1000, k in [-100, 100]."""
    i, j = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64),
                       indexing="ij")
    k = (i * 7919 + j * 104729 + salt * 15485863) % 201 - 100  # primes: no visible pattern
    return (k.astype(np.float32) / np.float32(1000.0)).astype(np.float32)


def _build() -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    arrays: dict[str, np.ndarray] = {}
    ops: list[dict[str, Any]] = []
    value = "x"
    macs = 0
    for layer, (fan_in, fan_out) in enumerate(zip(_SIZES[:-1], _SIZES[1:], strict=True)):
        name = f"fc{layer + 1}"
        arrays[f"{name}.weight"] = _weights(fan_out, fan_in, 2 * layer)  # (out, in) as torch
        arrays[f"{name}.bias"] = _weights(1, fan_out, 2 * layer + 1)[0]
        ops.append({"name": name, "op": "linear", "inputs": [value],
                    "weights": {"weight": f"{name}.weight", "bias": f"{name}.bias"}})
        value = name
        macs += fan_in * fan_out
        if layer < len(_SIZES) - 2:
            ops.append({"name": f"relu{layer + 1}", "op": "act", "inputs": [value],
                        "attrs": {"fn": "relu"}})
            value = f"relu{layer + 1}"
    graph = {
        "format": GRAPH_FORMAT, "version": GRAPH_VERSION,
        "input": {"name": "x", "shape": [_SIZES[0]], "dtype": "float32"},
        "outputs": [value], "ops": ops,
        "tensors": {k: {"encoding": "float32", "shape": list(v.shape)}
                    for k, v in sorted(arrays.items())},
    }
    manifest = {"model": "deepfleet-reference-mlp", "reference_version": _VERSION,
                "params": int(sum(a.size for a in arrays.values())), "macs": macs,
                "input_shape": [_SIZES[0]], "compressor": {"method": "none"}}
    return graph, arrays, manifest


def _cache_root() -> Path:
    return cache_dir() / "reference"


_LOCK = threading.Lock()  # parallel device threads may ask for it at the same moment


def reference_artifact(root: str | os.PathLike[str] | None = None) -> Artifact:
    """The reference artifact under ``root`` (default ``$DEEPFLEET_CACHE/reference``), built on
    first use and verified on every later one (a damaged cached copy is rebuilt)."""
    directory = Path(root) if root is not None else _cache_root()
    with _LOCK:
        cached = directory / REFERENCE_DIGEST
        if cached.is_dir():
            try:
                return open_artifact(cached)
            except (ArtifactError, OSError, ValueError):  # damaged: rebuild it below
                shutil.rmtree(cached, ignore_errors=True)
        graph, arrays, manifest = _build()
        return write_artifact(directory, graph, arrays, manifest)


class ReferenceTracker:
    """Per device: whether the reference is due, and the drift of its latest measurement.

    Keep one for a whole run (a search keeps one per study), so that drift is relative to the
    device's first reference of the run. Thread-safe (one thread per device uses it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[str, int] = {}  # measurements since the last good reference
        self._first: dict[str, float] = {}
        self._drift: dict[str, float] = {}

    def due(self, device: str, every: int) -> bool:
        """True before the device's first measurement and after every ``every`` measurements
        since its last good reference (a failed reference stays due). ``every`` 0: never."""
        if every <= 0:
            return False
        with self._lock:
            return device not in self._first or self._since.get(device, 0) >= every

    def counted(self, device: str) -> None:
        """Note one (non-reference) measurement attempt on ``device``."""
        with self._lock:
            self._since[device] = self._since.get(device, 0) + 1

    def record(self, device: str, p50_ms: float) -> float:
        """Note a good reference p50; return its drift (p50 / first p50 - 1)."""
        with self._lock:
            first = self._first.setdefault(device, p50_ms)
            self._since[device] = 0
            self._drift[device] = p50_ms / first - 1.0
            return self._drift[device]

    def drift(self, device: str) -> float | None:
        """The drift of the device's latest good reference (None before the first)."""
        with self._lock:
            return self._drift.get(device)
