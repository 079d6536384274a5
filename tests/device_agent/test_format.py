"""The artifact format library: the one artifact check and its errors."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from deepfleet.artifact import Artifact
from deepfleet.device_agent.format import (
    ArtifactCorrupt,
    ArtifactIncomplete,
    DigestMismatch,
    check_artifact,
    compressor_label,
    missing_files,
)
from deepfleet.device_agent.protocol import AgentError


def test_check_artifact_reports_missing_files_before_hashing(tiny_artifact: Artifact,
                                                             tmp_path: Path) -> None:
    path = tmp_path / tiny_artifact.path.name
    shutil.copytree(tiny_artifact.path, path)
    (path / "weights.npz").unlink()
    assert missing_files(str(path)) == ["weights.npz"]
    with pytest.raises(ArtifactIncomplete, match="lacks weights.npz") as info:
        check_artifact(str(path), verify=False)  # even without verification
    assert isinstance(info.value, ArtifactCorrupt) and info.value.missing == ["weights.npz"]


def test_check_artifact_without_verify_trusts_the_name(tiny_artifact: Artifact, tmp_path: Path) -> None:
    path = tmp_path / ("0" * 64)
    shutil.copytree(tiny_artifact.path, path)
    assert check_artifact(str(path), verify=False) == "0" * 64
    with pytest.raises(DigestMismatch, match=f"hashes to {tiny_artifact.digest}, not its name"):
        check_artifact(str(path))


@pytest.mark.parametrize("error", [
    ArtifactIncomplete("/a/b", ["graph.json"]),
    DigestMismatch("/a/b", "b", "c" * 64),
    AgentError("artifact_missing", "artifact /a/b lacks graph.json: upload it again"),
])
def test_errors_survive_pickling_with_their_fields(error: Exception) -> None:
    # Ray re-raises a worker's exception in the driver by pickling it.
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)


@pytest.mark.parametrize(("entry", "label"), [
    ({"methods": ["deepiot", "fixedpoint"]}, "deepiot+fixedpoint"),
    ({"methods": []}, "none"),
    ({"method": "magnitude"}, "magnitude"),
    ("lowrank", "lowrank"),
    (None, None),
])
def test_compressor_label(entry: object, label: str | None) -> None:
    assert compressor_label(entry) == label
