"""Loading a run: locating its parts, and schema-version upgrades when one is known."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from deepfleet.errors import ResultsError
from deepfleet.orchestrator.results import SCHEMA_VERSION, write_results
from deepfleet.report import _load
from tests.report.runs import measurement_rows


def test_rows_of_an_older_version_are_upgraded_when_an_upgrade_is_known(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = SCHEMA_VERSION - 1
    write_results(tmp_path / "results", measurement_rows("s", 2) + measurement_rows("s", 3, schema_version=old))

    def upgrade(frame: pd.DataFrame) -> pd.DataFrame:
        # e.g. a column renamed or re-scaled between versions; here: mark the rows
        return frame.assign(schema_version=old + 1, simulated="upgraded")

    monkeypatch.setitem(_load.UPGRADES, old, upgrade)
    run = _load.load_run(tmp_path)
    assert len(run.results) == 5 and set(run.results["schema_version"]) == {SCHEMA_VERSION}
    assert (run.results["simulated"] == "upgraded").sum() == 3
    monkeypatch.delitem(_load.UPGRADES, old)
    with pytest.raises(ResultsError, match=f"knows no upgrade from {old}"):
        _load.load_run(tmp_path)


def test_locate_finds_the_parts_of_a_run_from_either_directory(tmp_path: Path) -> None:
    write_results(tmp_path / "results", measurement_rows("s", 1))
    (tmp_path / "candidates").mkdir()
    for given in (tmp_path, tmp_path / "results"):
        loc = _load.locate(given)
        assert loc.run == tmp_path and loc.results == tmp_path / "results"
        assert loc.candidates == tmp_path / "candidates" and loc.artifacts is None
