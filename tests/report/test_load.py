"""Loading a run: locating its parts, and rows of an older schema version (upgraded on read)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
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
                                           f"versions {SCHEMA_VERSION} and knows no upgrade"):
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
