"""Artifact directories: the unit that travels from the compressors to the devices.

An artifact is a directory named by the sha256 of its content holding ``graph.json``,
``weights.npz`` and ``manifest.json``. The format itself (the hash, the checks, the tensor
encodings) is the library ``deepfleet.device_agent.format``, shared with the device agent; this
module writes artifacts and turns the library's check failures into :class:`ArtifactError`. Files are written deterministically (sorted JSON keys, a
stored zip with fixed timestamps), so the same model exported twice has the same hash, and the
directory appears atomically (written under a temporary name, then renamed).
"""

from __future__ import annotations

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

from deepfleet.device_agent.format import (
    ARTIFACT_FILES,
    ArtifactIncomplete,
    DigestMismatch,
    artifact_digest,
    check_artifact,
)
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
    manifest: dict[str, Any],
) -> Artifact:
    """Write an artifact under ``root``; return it. Idempotent: an existing one is kept.

    ``manifest`` gains ``weights_bytes`` (size of weights.npz); it must hold plain JSON data.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        (tmp / "graph.json").write_bytes(_dump_json(graph))
        _write_npz(tmp / "weights.npz", arrays)
        manifest = {**manifest, "weights_bytes": (tmp / "weights.npz").stat().st_size}
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
    return Artifact(p, digest, json.loads((p / "manifest.json").read_text()))
