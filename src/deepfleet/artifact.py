"""Artifact directories: the unit that travels from the compressors to the devices.

An artifact is a directory named by the sha256 of its content holding ``graph.json``,
``weights.npz`` and ``manifest.json``, and beside them ``model.onnx`` (the same graph for
onnxruntime, see ``deepfleet._onnx``) whose sha256 the manifest holds, so the artifact hash
covers it too; likewise ``model.tflite`` (LiteRT, batch 1, see ``deepfleet._litert``) when the
converter is installed. The format itself (the hash, the checks, the tensor encodings) is the library
``deepfleet.device_agent.format``, shared with the device agent; this module builds and writes
artifacts and turns the library's check failures into :class:`ArtifactError`. Files are written
deterministically (sorted JSON keys, a stored zip with fixed timestamps, ONNX built field by
field), so the same model exported twice has the same hash, and the directory appears atomically
(written under a temporary name, then renamed).
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

from deepfleet.device_agent.format import (
    ARTIFACT_FILES,
    BACKEND_FILES,
    MANIFEST_KEYS,
    ArtifactIncomplete,
    DigestMismatch,
    artifact_digest,
    check_artifact,
    digest_of,
    file_digest,
)
from deepfleet.errors import ArtifactError

if TYPE_CHECKING:
    from deepfleet._litert import TfliteModel
    from deepfleet._onnx import OnnxModel

ONNX_FILE = BACKEND_FILES["onnxruntime"]  # "model.onnx", where the agent's backend reads it
TFLITE_FILE = BACKEND_FILES["litert"]  # "model.tflite"
# Backend files an artifact may carry, with the manifest key that holds each one's sha256.
DECLARED_FILES = {BACKEND_FILES[backend]: key for backend, key in MANIFEST_KEYS.items()}

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
    """The files an artifact directory ships: the three, and model.onnx / model.tflite when it
    has them."""
    return ARTIFACT_FILES + tuple(f for f in DECLARED_FILES if (Path(path) / f).is_file())


def _dump_json(obj: Any) -> bytes:
    # Compact: on a 1 %-size, 8-bit model the JSON files are a third of the artifact, and
    # artifact bytes are what a device downloads and stores (`python -m json.tool` reads it).
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A valid .npz (np.load reads it) with deterministic bytes: sorted, stored, fixed times."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())
    return out.getvalue()


@dataclass(frozen=True)
class ArtifactFiles:
    """An artifact in memory: its files' bytes and its digest (plain data: it travels from a
    Ray worker to the driver, which writes it once with :func:`save_artifact`)."""

    digest: str
    files: dict[str, bytes]

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.files["manifest.json"])

    @property
    def bytes(self) -> int:
        """Bytes of the three artifact files (what the numpy runtime needs; ``model.onnx`` and
        ``model.tflite`` are the same model for other runtimes and not counted)."""
        return sum(len(self.files[f]) for f in ARTIFACT_FILES)


def build_artifact(graph: dict[str, Any], arrays: dict[str, np.ndarray], manifest: dict[str, Any], *,
                   onnx: OnnxModel | bool = True, tflite: TfliteModel | None = None) -> ArtifactFiles:
    """The artifact's files and digest, in memory.

    ``manifest`` gains ``weights_bytes`` (size of weights.npz); it must hold plain JSON data.
    ``onnx``: True converts the graph to ``model.onnx``, checked against the numpy runtime
    (``deepfleet._onnx.export_onnx``); an ``OnnxModel`` is written as given (its caller checked
    it, against torch); False writes none (a graph that cannot run). With one, the manifest
    gains ``onnx``: file, sha256, opset, and what its weights and activations are. ``tflite``
    (a checked ``deepfleet._litert.TfliteModel``) is written as ``model.tflite`` and declared
    the same way under ``tflite``. Raises ExportError when the conversion or its check fails.
    """
    if onnx is True:
        from deepfleet._onnx import export_onnx

        onnx = export_onnx(graph, arrays)
    weights = _npz_bytes(arrays)
    manifest = {**manifest, "weights_bytes": len(weights)}
    files = {"graph.json": _dump_json(graph), "weights.npz": weights}
    for name, model in ((ONNX_FILE, onnx or None), (TFLITE_FILE, tflite)):
        if model is not None:  # a runtime's file, declared in the manifest with its sha256
            files[name] = model.data
            manifest[DECLARED_FILES[name]] = {"file": name, "sha256": hashlib.sha256(model.data).hexdigest(),
                                              **model.info}
    files["manifest.json"] = _dump_json(manifest)
    digest = digest_of({name: hashlib.sha256(files[name]).hexdigest() for name in ARTIFACT_FILES})
    return ArtifactFiles(digest, files)


def save_artifact(root: str | os.PathLike[str], artifact: ArtifactFiles) -> Artifact:
    """Write ``artifact`` as ``root/<digest>/`` and return it. Atomic (written under a
    temporary name, then renamed) and idempotent: an existing one is kept."""
    root = Path(root)
    final = root / artifact.digest
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
        try:
            for name, data in artifact.files.items():
                (tmp / name).write_bytes(data)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():  # not a writer that won the race with identical content
                raise
    return Artifact(final, artifact.digest, artifact.manifest)


def write_artifact(
    root: str | os.PathLike[str], graph: dict[str, Any], arrays: dict[str, np.ndarray],
    manifest: dict[str, Any], *, onnx: OnnxModel | bool = True, tflite: TfliteModel | None = None,
) -> Artifact:
    """:func:`build_artifact` then :func:`save_artifact`."""
    return save_artifact(root, build_artifact(graph, arrays, manifest, onnx=onnx, tflite=tflite))


def open_artifact(path: str | os.PathLike[str], *, verify: bool = True) -> Artifact:
    """Open an artifact directory; with ``verify`` check that its content matches its name.

    Raises ArtifactError naming the path and the fix when files are missing or (with
    ``verify``) the content does not hash to the directory's name; the check is the format
    library's :func:`~deepfleet.device_agent.format.check_artifact`, the one the agent runs.
    """
    p = Path(path)
    try:
        digest = check_artifact(str(p), verify)
    except ArtifactIncomplete as exc:
        raise ArtifactError(
            f"{p} is not an artifact: it lacks {', '.join(exc.missing)}; give a directory written "
            "by 'deepfleet compress'"
        ) from None
    except DigestMismatch as exc:
        raise ArtifactError(
            f"artifact {p} is corrupt: its content hashes to {exc.actual[:12]}..., not its name; "
            "export it again"
        ) from None
    except OSError as exc:
        raise ArtifactError(f"artifact {p} cannot be read ({exc}); check its permissions or "
                            "export it again") from None
    if not verify:
        digest = artifact_digest(str(p))  # Artifact.digest is always the content's hash
    manifest = json.loads((p / "manifest.json").read_text())
    for name, key in DECLARED_FILES.items() if verify else ():
        declared = manifest.get(key)
        if declared and (not (p / name).is_file() or file_digest(str(p / name)) != declared["sha256"]):
            raise ArtifactError(
                f"artifact {p} is corrupt: its {name} is missing or does not match the sha256 in "
                "its manifest; export it again"
            )
    return Artifact(p, digest, manifest)
