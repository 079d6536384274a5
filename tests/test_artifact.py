"""deepfleet.artifact: opening an artifact runs the format library's check, as the agent does,
and turns its failures into ArtifactError naming the path and the fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deepfleet.artifact import Artifact, open_artifact
from deepfleet.device_agent.format import DigestMismatch, artifact_digest, check_artifact
from deepfleet.errors import ArtifactError


def _copy(art: Artifact, root: Path) -> Path:
    dest = root / art.path.name  # same name: the same expected hash
    shutil.copytree(art.path, dest)
    return dest


def test_a_good_artifact_opens_with_its_manifest(tiny_artifact: Artifact) -> None:
    art = open_artifact(tiny_artifact.path)
    assert art.digest == tiny_artifact.path.name == check_artifact(str(tiny_artifact.path))
    assert art.manifest["model"] == "tiny" and art.bytes > 0


def test_missing_files_name_the_path_the_files_and_the_fix(tiny_artifact: Artifact,
                                                          tmp_path: Path) -> None:
    path = _copy(tiny_artifact, tmp_path)
    (path / "manifest.json").unlink()
    (path / "graph.json").unlink()
    with pytest.raises(ArtifactError) as info:
        open_artifact(path)
    message = str(info.value)
    assert str(path) in message and "graph.json, manifest.json" in message
    assert "'deepfleet compress'" in message


def test_a_changed_byte_is_corruption_unless_verification_is_off(tiny_artifact: Artifact,
                                                                 tmp_path: Path) -> None:
    path = _copy(tiny_artifact, tmp_path)
    weights = path / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    actual = artifact_digest(str(path))
    with pytest.raises(DigestMismatch) as mismatch:  # the library's check, as the agent runs it
        check_artifact(str(path))
    assert mismatch.value.actual == actual and mismatch.value.expected == path.name
    with pytest.raises(ArtifactError, match=f"artifact {path} is corrupt: its content hashes to "
                                            f"{actual[:12]}.*export it again"):
        open_artifact(path)
    assert open_artifact(path, verify=False).digest == actual  # the content's hash, not the name
