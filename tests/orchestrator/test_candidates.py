from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepfleet.candidate import Candidate, Layer
from deepfleet.errors import ResultsError
from deepfleet.orchestrator.candidates import candidate_row, read_candidates, write_candidates

LAYER = Layer(name="fc1", kind="linear", units_before=500, units_after=20, params_before=400_500,
              params_after=16_020, pruned=True, nonzero_after=16_020, bits_per_weight=8.0)
CAND = Candidate(model="lenet5", data="digits", method="deepiot+fixedpoint", artifact_hash="ab" * 32,
                 accuracy_val=0.97, accuracy_test=0.968, accuracy_drop_pp=1.0, params=8000, macs=90_000,
                 bytes=12_000, kept_params=0.018, layers=(LAYER,), node="n1", train_seconds=12.5)


def test_candidates_round_trip_per_study(tmp_path: Path) -> None:
    base = Candidate(**{**CAND.to_dict(), "method": "none", "layers": (), "node": None, "train_seconds": None})
    rows = [
        candidate_row(study="a b/c", kind="baseline", outcome="baseline", candidate=base),
        candidate_row(study="a b/c", kind="candidate", outcome="measured", trial=3, candidate=CAND,
                      trial_params={"deepiot.target": 0.01, "method": "deepiot+fixedpoint"},
                      objectives=[{"metric": "accuracy", "device_class": None, "value": 0.97},
                                  {"metric": "latency_p50", "device_class": "pi", "value": 1.5}],
                      constraints=[{"label": "bytes<=20000", "metric": "bytes", "device_class": None,
                                    "max": 20_000.0, "excess": -8000.0}],
                      predictions=[{"metric": "latency_p50", "device_class": "pi", "value": 1.4, "error": 0.05,
                                    "points": 6}], values_source="measured"),
    ]
    write_candidates(tmp_path, rows)
    write_candidates(tmp_path, [candidate_row(study="2024", kind="candidate", outcome="failed", trial=0,
                                              fail_reason="all devices of class 'pi' are down")])
    df = read_candidates(tmp_path, study="a b/c")
    assert list(df["trial"].astype("object").where(df["trial"].notna(), None)) == [None, 3]
    got = df.loc[1]
    assert got["trial_params"] == {"deepiot.target": 0.01, "method": "deepiot+fixedpoint"}
    assert got["layers"][0]["units_after"] == 20 and got["objectives"][1]["device_class"] == "pi"
    assert got["constraints"][0]["excess"] == -8000.0 and got["predictions"][0]["points"] == 6
    # the candidate is stored field for field: the same names and values come back
    assert {k: got[k] for k in ("method", "accuracy_val", "params", "bytes", "node")} == {
        "method": CAND.method, "accuracy_val": CAND.accuracy_val, "params": CAND.params, "bytes": CAND.bytes,
        "node": "n1"}
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


def test_a_write_leaves_only_whole_files(tmp_path: Path) -> None:
    write_candidates(tmp_path, [candidate_row(study="s", kind="candidate", outcome="measured", trial=0,
                                              candidate=CAND)])
    files = sorted(tmp_path.rglob("*"))
    assert not [f for f in files if f.name.startswith(".staging-")]  # the writer's own staging
    parts = [f for f in files if f.is_file()]
    assert len(parts) == 1 and parts[0].parent.name == "study=s" and pq.read_table(parts[0]).num_rows == 1


def test_version_1_files_are_upgraded_when_read(tmp_path: Path) -> None:
    """Files written before nested columns: *_json text, 'metric@class' labels."""
    v1 = pa.Table.from_pylist([{
        "schema_version": 1, "trial": 0, "kind": "candidate", "outcome": "measured", "method": "deepiot",
        "params_json": '{"deepiot.target": 0.02}', "model": "lenet5", "data": "digits", "artifact_hash": "h",
        "accuracy_val": 0.97, "accuracy_test": 0.96, "accuracy_drop_pp": 0.5, "params": 10, "macs": 20, "bytes": 30,
        "kept_params": 0.1, "layers_json": '[{"name": "fc1", "units_before": 5, "units_after": 2}]',
        "objectives_json": '{"accuracy": 0.97, "latency_p50@pi": 1.5}',
        "constraints_json": '{"latency_p50@pi<=2": -0.5}', "values_source": "measured",
        "predicted_json": '{"latency_p50@pi": 1.4}', "fail_reason": None, "node": None, "train_seconds": 3.0,
        "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}])
    (tmp_path / "study=old").mkdir()
    pq.write_table(v1, tmp_path / "study=old" / "part-0.parquet")
    df = read_candidates(tmp_path, study="old")
    row = df.loc[0]
    assert row["schema_version"] == 1 and row["trial_params"] == {"deepiot.target": 0.02}
    assert [(o["metric"], o["device_class"], o["value"]) for o in row["objectives"]] == [
        ("accuracy", None, 0.97), ("latency_p50", "pi", 1.5)]
    assert row["constraints"][0]["excess"] == -0.5 and row["layers"][0]["units_after"] == 2


def test_bad_rows_and_missing_dataset(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="outcome 'ok' is not one of"):
        candidate_row(study="s", kind="candidate", outcome="ok")
    with pytest.raises(ResultsError, match="unknown candidate field"):
        candidate_row(study="s", kind="candidate", outcome="failed", accuracy=1.0)
    with pytest.raises(ResultsError, match="no candidates dataset"):
        read_candidates(tmp_path / "none")


def test_kept_inputs_and_sensors_round_trip_and_older_files_read_them_as_null(tmp_path: Path) -> None:
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from deepfleet.orchestrator.candidates import CANDIDATES_SCHEMA, candidate_of

    masked = dataclasses.replace(CAND, artifact_hash="cd" * 32, sensors_kept=("accelerometer",),
                                 inputs_kept=(0, 1, 2))
    write_candidates(tmp_path, [candidate_row(study="s", kind="candidate", outcome="measured", trial=1,
                                              candidate=masked)])
    # a file written before the two columns existed
    old = pa.schema([f for f in CANDIDATES_SCHEMA if f.name not in ("sensors_kept", "inputs_kept", "study")])
    row = {k: v for k, v in candidate_row(study="s", kind="candidate", outcome="measured", trial=0,
                                          candidate=CAND).items() if k in old.names}
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "study=s" / "part-old.parquet")
    df = read_candidates(tmp_path, study="s")
    by_trial = {int(r["trial"]): candidate_of(r) for _, r in df.iterrows()}
    assert by_trial[1] == masked and by_trial[1].sensors_kept == ("accelerometer",)
    assert by_trial[0].sensors_kept is None and by_trial[0].inputs_kept is None


def test_calibration_fields_round_trip_and_version_2_files_read_them_as_null(tmp_path: Path) -> None:
    from deepfleet.orchestrator.candidates import CANDIDATES_SCHEMA, candidate_of

    cand = Candidate(**{**CAND.to_dict(), "layers": CAND.layers, "ece": 0.031, "nll": 0.22, "brier": 0.09})
    write_candidates(tmp_path, [candidate_row(study="new", kind="candidate", outcome="measured", trial=0,
                                              candidate=cand)])
    assert candidate_of(read_candidates(tmp_path, study="new").loc[0]) == cand
    # a version-2 file, written before the calibration columns existed
    row = candidate_row(study="old", kind="candidate", outcome="measured", trial=0, candidate=CAND)
    v2_schema = pa.schema([f for f in CANDIDATES_SCHEMA if f.name not in ("ece", "nll", "brier")])
    v2 = pa.Table.from_pylist([{**{k: v for k, v in row.items() if k in v2_schema.names}, "schema_version": 2}],
                              schema=v2_schema)
    (tmp_path / "study=old").mkdir()
    pq.write_table(v2.drop_columns(["study"]), tmp_path / "study=old" / "part-0.parquet")
    old = read_candidates(tmp_path, study="old").loc[0]
    assert old["schema_version"] == 2 and old["method"] == CAND.method
    assert all(old[k] is None or old[k] != old[k] for k in ("ece", "nll", "brier"))  # null
    assert candidate_of(old).ece is None and candidate_of(old).accuracy_val == CAND.accuracy_val
