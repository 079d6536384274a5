from __future__ import annotations

import json
from pathlib import Path

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
    assert not list(tmp_path.rglob(".*.tmp"))  # nothing half-written left behind


def test_bad_rows_and_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="outcome 'ok' is not one of"):
        candidate_row(study="s", kind="candidate", outcome="ok")
    with pytest.raises(ResultsError, match="unknown candidate field"):
        candidate_row(study="s", kind="candidate", outcome="failed", accuracy=1.0)
    with pytest.raises(ResultsError, match="no candidates dataset"):
        read_candidates(tmp_path / "none")
