"""Loading a run: locating its parts, and schema-version upgrades when one is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepfleet.errors import ResultsError
from deepfleet.orchestrator import results as res_mod
from deepfleet.orchestrator.results import SCHEMA_VERSION, write_results
from deepfleet.report import _load
from tests.report.runs import measurement_rows


def test_the_report_reads_older_rows_through_the_results_upgrades(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report reads rows through read_results, which applies orchestrator.results.UPGRADES:
    older rows are upgraded there, once, for every reader."""
    old = SCHEMA_VERSION - 1
    rows = measurement_rows("s", 2) + measurement_rows("s", 3, schema_version=old, backend="numpy",
                                                                backend_version=None)
    write_results(tmp_path / "results", rows)
    run = _load.load_run(tmp_path)
    assert len(run.results) == 5 and sorted(set(run.results["schema_version"])) == [old, SCHEMA_VERSION]
    older = run.results.loc[run.results["schema_version"] == old]
    assert (older["backend_version"] == older["device_numpy"]).all()  # the 2 -> 3 upgrade ran
    monkeypatch.delitem(res_mod.UPGRADES, old)
    with pytest.raises(ResultsError, match=rf"schema version {old} \(e\.g\. .*\.parquet\).*knows no upgrade"):
        _load.load_run(tmp_path)


def test_locate_finds_the_parts_of_a_run_from_either_directory(tmp_path: Path) -> None:
    write_results(tmp_path / "results", measurement_rows("s", 1))
    (tmp_path / "candidates").mkdir()
    for given in (tmp_path, tmp_path / "results"):
        loc = _load.locate(given)
        assert loc.run == tmp_path and loc.results == tmp_path / "results"
        assert loc.candidates == tmp_path / "candidates" and loc.artifacts is None
