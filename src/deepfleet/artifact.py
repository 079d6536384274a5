"""Artifact directories: the unit that travels from the compressors to the devices.

An artifact is a directory named by the sha256 of its content (see
``device_agent.agent.artifact_digest``, the one definition of that hash) holding ``graph.json``,
``weights.npz`` and ``manifest.json``. Files are written deterministically (sorted JSON keys, a
stored zip with fixed timestamps), so the same model exported twice has the same hash, and the
directory appears atomically (written under a temporary name, then renamed).
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
from typing import Any

import numpy as np

from deepfleet.device_agent.agent import ARTIFACT_FILES, artifact_digest, digest_of
from deepfleet.errors import ArtifactError

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
        return sum(len(b) for b in self.files.values())


def build_artifact(graph: dict[str, Any], arrays: dict[str, np.ndarray],
                   manifest: dict[str, Any]) -> ArtifactFiles:
    """The artifact's files and digest, in memory. ``manifest`` gains ``weights_bytes`` (size of
    weights.npz); it must hold plain JSON data."""
    weights = _npz_bytes(arrays)
    files = {"graph.json": _dump_json(graph), "weights.npz": weights,
             "manifest.json": _dump_json({**manifest, "weights_bytes": len(weights)})}
    digest = digest_of({name: hashlib.sha256(data).hexdigest() for name, data in files.items()})
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
    manifest: dict[str, Any],
) -> Artifact:
    """:func:`build_artifact` then :func:`save_artifact`."""
    return save_artifact(root, build_artifact(graph, arrays, manifest))


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
    return Artifact(p, digest, json.loads((p / "manifest.json").read_text()))
