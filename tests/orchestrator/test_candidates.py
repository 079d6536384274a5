from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepfleet.errors import ResultsError
from deepfleet.orchestrator.candidates import candidate_row, read_candidates, write_candidates


def test_candidates_round_trip_per_study(tmp_path: Path) -> None:
    rows = [
        candidate_row(study="a b/c", kind="baseline", outcome="baseline", accuracy_val=0.98, params=431080,
                      layers_json=[{"name": "fc1", "units_before": 500, "units_after": 500}]),
        candidate_row(study="a b/c", kind="candidate", outcome="measured", trial=3, accuracy_val=0.97,
                      params_json={"deepiot.target": 0.01}, objectives_json={"accuracy": 0.97}),
    ]
    write_candidates(tmp_path, rows)
    write_candidates(tmp_path, [candidate_row(study="2024", kind="candidate", outcome="failed", trial=0,
                                              fail_reason="all devices of class 'pi' are down")])
    df = read_candidates(tmp_path, study="a b/c")
    assert list(df["trial"].astype("object").where(df["trial"].notna(), None)) == [None, 3]
    assert json.loads(df.loc[1, "params_json"]) == {"deepiot.target": 0.01}
    assert json.loads(df.loc[0, "layers_json"])[0]["units_after"] == 500
    other = read_candidates(tmp_path, study="2024")
    assert other.loc[0, "study"] == "2024" and other.loc[0, "outcome"] == "failed"
    assert len(read_candidates(tmp_path)) == 3
    # nothing half-written left behind: the writer stages in ROOT/.staging-<uuid>/
    assert not list(tmp_path.rglob(".staging-*"))


def test_a_reader_sees_whole_writes_only_and_no_staging_is_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the moment each file is published (the rename into place), it lies complete in a
    hidden staging folder and a reader sees exactly the earlier writes; afterwards nothing
    of the staging is left."""
    real_replace = os.replace
    published: list[tuple[bool, int, int]] = []

    def publish(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        staged = Path(src).relative_to(tmp_path).parts[0].startswith(".staging-")
        published.append((staged, pq.read_metadata(src).num_rows, len(read_candidates(tmp_path))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", publish)
    for i in range(3):
        write_candidates(tmp_path, [candidate_row(study="s", kind="candidate", outcome="measured",
                                                  trial=3 * i + j) for j in range(3)])
    monkeypatch.undo()
    assert published == [(True, 3, 0), (True, 3, 3), (True, 3, 6)]
    files = sorted(tmp_path.rglob("*.parquet"))
    assert len(files) == 3 and all(pq.read_metadata(f).num_rows == 3 for f in files)
    assert sorted(read_candidates(tmp_path)["trial"]) == list(range(9))
    assert [p.name for p in tmp_path.iterdir()] == ["study=s"]  # no .staging-* folder left


def test_bad_rows_and_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="outcome 'ok' is not one of"):
        candidate_row(study="s", kind="candidate", outcome="ok")
    with pytest.raises(ResultsError, match="unknown candidate field"):
        candidate_row(study="s", kind="candidate", outcome="failed", accuracy=1.0)
    with pytest.raises(ResultsError, match="no candidates dataset"):
        read_candidates(tmp_path / "none")
