"""Loading a run: locating its parts, and rows of an older schema version (upgraded on read)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepfleet.errors import ResultsError
from deepfleet.orchestrator import results as res_mod
from deepfleet.orchestrator.results import SCHEMA_VERSION, read_results, write_results
from deepfleet.report import _load, build_report
from tests.report.runs import measurement_rows, write_v1_results


def test_version_1_rows_are_reported_with_null_drift(tmp_path: Path) -> None:
    """A real version-1 file (no drift column) beside version-2 rows: the report reads both, as
    read_results does (the upgrade lives in orchestrator.results, once), drift null for v1."""
    results = tmp_path / "results"
    write_results(results, measurement_rows("s", 2, drift=0.03))
    old_file = write_v1_results(results, measurement_rows("s", 3))
    assert "drift" not in pq.read_schema(old_file).names
    run = _load.load_run(tmp_path)
    by_version = run.results.groupby("schema_version")["drift"]
    assert by_version.size().to_dict() == {1: 3, SCHEMA_VERSION: 2}  # versions kept
    assert by_version.apply(lambda d: d.isna().all()).to_dict() == {1: True, SCHEMA_VERSION: False}
    direct = read_results(results, "s")
    pd.testing.assert_frame_equal(run.results, direct)  # one answer for both readers
    files, report = build_report(tmp_path, out=tmp_path / "out" / "report.html")
    assert report.facts["measurement rows"].startswith("5 ")
    assert len(pd.read_csv(files.tables / "latency_by_device.csv")) == 1


def test_without_the_upgrade_both_readers_refuse_version_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The upgrade is in one place: take it away there and read_results and the report both
    refuse the version-1 rows (the report naming the file)."""
    results = tmp_path / "results"
    write_results(results, measurement_rows("s", 1))
    old_file = write_v1_results(results, measurement_rows("s", 1))
    monkeypatch.delitem(res_mod.UPGRADES, 1)
    with pytest.raises(ResultsError, match="holds rows of schema version 1; this deepfleet reads "
                                           f"versions {', '.join(map(str, range(2, SCHEMA_VERSION + 1)))} and knows no upgrade"):
        read_results(results)
    with pytest.raises(ResultsError, match=rf"schema version 1 \(e\.g\. {old_file}\)"):
        _load.load_run(tmp_path)


def test_locate_finds_the_parts_of_a_run_from_either_directory(tmp_path: Path) -> None:
    write_results(tmp_path / "results", measurement_rows("s", 1))
    (tmp_path / "candidates").mkdir()
    for given in (tmp_path, tmp_path / "results"):
        loc = _load.locate(given)
        assert loc.run == tmp_path and loc.results == tmp_path / "results"
        assert loc.candidates == tmp_path / "candidates" and loc.artifacts is None


# The candidates schema as version 1 wrote it (partition column ``study`` in the folder name).
_CANDIDATES_V1 = pa.schema([
    ("schema_version", pa.int16()), ("trial", pa.int64()), ("kind", pa.string()),
    ("outcome", pa.string()), ("method", pa.string()), ("params_json", pa.string()),
    ("model", pa.string()), ("data", pa.string()), ("artifact_hash", pa.string()),
    ("accuracy_val", pa.float64()), ("accuracy_test", pa.float64()),
    ("accuracy_drop_pp", pa.float64()), ("params", pa.int64()), ("macs", pa.int64()),
    ("bytes", pa.int64()), ("kept_params", pa.float64()), ("layers_json", pa.string()),
    ("objectives_json", pa.string()), ("constraints_json", pa.string()),
    ("values_source", pa.string()), ("predicted_json", pa.string()), ("fail_reason", pa.string()),
    ("node", pa.string()), ("train_seconds", pa.float64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])


def test_version_1_candidates_are_reported_and_their_drop_limit_read_from_the_label(
        tmp_path: Path) -> None:
    """Candidate files of schema version 1 (``*_json`` text) are upgraded by read_candidates;
    the report takes them (it refused every version but the current one) and reads the study's
    accuracy_drop_pp limit from the constraint's label (version 1 recorded no ``max``)."""
    write_results(tmp_path / "results", measurement_rows("s", 2))
    base = {"schema_version": 1, "trial": None, "kind": "baseline", "outcome": "baseline",
            "method": "none", "model": "lenet5", "data": "digits", "artifact_hash": "ab" * 32,
            "accuracy_val": 0.98, "accuracy_drop_pp": 0.0, "params": 10, "bytes": 40,
            "constraints_json": None, "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}
    trial = base | {"trial": 0, "kind": "candidate", "outcome": "measured", "method": "deepiot",
                    "accuracy_val": 0.975, "accuracy_drop_pp": 0.5,
                    "constraints_json": '{"accuracy_drop_pp<=1.5": -1.0, "bytes<=100": -60}'}
    (tmp_path / "candidates" / "study=s").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([base, trial], schema=_CANDIDATES_V1),
                   tmp_path / "candidates" / "study=s" / "part-v1.parquet")
    run = _load.load_run(tmp_path)
    assert run.candidates is not None and set(run.candidates["schema_version"]) == {1}
    assert run.drop_limits == {"accuracy_drop_pp<=1.5": 1.5}
    _, report = build_report(tmp_path, out=tmp_path / "out" / "report.html")
    assert report.max_drop_pp == 1.5 and "accuracy_drop_pp<=1.5" in report.max_drop_source
