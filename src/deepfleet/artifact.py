"""Artifact directories: the unit that travels from the compressors to the devices.

An artifact is a directory named by the sha256 of its content (see
``device_agent.agent.artifact_digest``, the one definition of that hash) holding ``graph.json``,
``weights.npz`` and ``manifest.json``, and beside them ``model.onnx`` (the same graph for
onnxruntime, see ``deepfleet._onnx``) whose sha256 the manifest holds, so the artifact hash
covers it too. Files are written deterministically (sorted JSON keys, a stored zip with fixed
timestamps, ONNX built field by field), so the same model exported twice has the same hash, and
the directory appears atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deepfleet.device_agent.agent import ARTIFACT_FILES, BACKEND_FILES, artifact_digest, file_digest
from deepfleet.errors import ArtifactError

if TYPE_CHECKING:
    from deepfleet._onnx import OnnxModel

ONNX_FILE = BACKEND_FILES["onnxruntime"]  # "model.onnx", where the agent's backend reads it

_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest timestamp: no wall clock in the content


@dataclass(frozen=True)
class Artifact:
    path: Path
    digest: str
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        """Size on disk of the three files."""
        return sum((self.path / f).stat().st_size for f in ARTIFACT_FILES)


def artifact_files(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The files an artifact directory ships: the three, and model.onnx when it has one."""
    return ARTIFACT_FILES + ((ONNX_FILE,) if (Path(path) / ONNX_FILE).is_file() else ())


def _dump_json(obj: Any) -> bytes:
    # Compact: on a 1 %-size, 8-bit model the JSON files are a third of the artifact, and
    # artifact bytes are what a device downloads and stores (`python -m json.tool` reads it).
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A valid .npz (np.load reads it) with deterministic bytes: sorted, stored, fixed times."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def write_artifact(
    root: str | os.PathLike[str], graph: dict[str, Any], arrays: dict[str, np.ndarray],
    manifest: dict[str, Any], *, onnx: OnnxModel | bool = True,
) -> Artifact:
    """Write an artifact under ``root``; return it. Idempotent: an existing one is kept.

    ``manifest`` gains ``weights_bytes`` (size of weights.npz); it must hold plain JSON data.
    ``onnx``: True converts the graph to ``model.onnx``, checked against the numpy runtime
    (``deepfleet._onnx.export_onnx``); an ``OnnxModel`` is written as given (its caller checked
    it, against torch); False writes none (a graph that cannot run). With one, the manifest
    gains ``onnx``: file, sha256, opset, and what its weights and activations are. Raises
    ExportError (nothing written) when the conversion or its check fails.
    """
    if onnx is True:
        from deepfleet._onnx import export_onnx

        onnx = export_onnx(graph, arrays)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        (tmp / "graph.json").write_bytes(_dump_json(graph))
        _write_npz(tmp / "weights.npz", arrays)
        manifest = {**manifest, "weights_bytes": (tmp / "weights.npz").stat().st_size}
        if onnx:
            (tmp / ONNX_FILE).write_bytes(onnx.data)
            manifest["onnx"] = {"file": ONNX_FILE, "sha256": hashlib.sha256(onnx.data).hexdigest(), **onnx.info}
        (tmp / "manifest.json").write_bytes(_dump_json(manifest))
        digest = artifact_digest(str(tmp))
        final = root / digest
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Artifact(final, digest, manifest)


def open_artifact(path: str | os.PathLike[str], *, verify: bool = True) -> Artifact:
    """Open an artifact directory; with ``verify`` check that its content matches its name."""
    p = Path(path)
    missing = [f for f in ARTIFACT_FILES if not (p / f).is_file()]
    if missing:
        raise ArtifactError(
            f"{p} is not an artifact: it lacks {', '.join(missing)}; give a directory written by "
            "'deepfleet compress'"
        )
    digest = artifact_digest(str(p))
    if verify and digest != p.name:
        raise ArtifactError(
            f"artifact {p} is corrupt: its content hashes to {digest[:12]}..., not its name; "
            "export it again"
        )
    manifest = json.loads((p / "manifest.json").read_text())
    onnx = manifest.get("onnx")
    if verify and onnx and (not (p / ONNX_FILE).is_file() or file_digest(str(p / ONNX_FILE)) != onnx["sha256"]):
        raise ArtifactError(
            f"artifact {p} is corrupt: its {ONNX_FILE} is missing or does not match the sha256 in "
            "its manifest; export it again"
        )
    return Artifact(p, digest, manifest)
