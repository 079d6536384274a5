"""Results dataset: schema, hive partitions, atomic append-only writes, pandas round trips."""

from __future__ import annotations

import datetime as dt
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepfleet.artifact import Artifact
from deepfleet.errors import ResultsError
from deepfleet.orchestrator.results import (
    RESULTS_SCHEMA,
    SCHEMA_VERSION,
    UPGRADES,
    failure_row,
    measurement_row,
    plain_rows,
    read_results,
    readable,
    write_results,
)
from tests.conftest import AgentProcess

T0 = dt.datetime(2026, 1, 31, 12, 0, tzinfo=dt.timezone.utc)
DATA = Path(__file__).parent / "data"


def _row(study: str = "s1", device: str = "dev-1", **extra: Any) -> dict[str, Any]:
    """A small synthetic row (a failure row is the simplest valid one)."""
    return failure_row(study=study, device=device, device_class="x86", artifact_hash="ab" * 32,
                       error="synthetic", started_at=T0, **extra)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if not any(
        part.startswith(".") for part in p.relative_to(root).parts))


def test_a_real_measurement_round_trips(agent: AgentProcess, tiny_artifact: Artifact,
                                        tmp_path: Path) -> None:
    r = agent.request({"op": "measure", "artifact": str(tiny_artifact.path), "min_runs": 20,
                       "min_seconds": 0, "warmup": 1, "energy": {"source": "none"}, "threads": 1,
                       "power": {"active_w": 3.0}}, timeout=60)
    assert r["ok"], r
    row = measurement_row(r, study="study-a", device="local", device_class="x86_64", trial=4,
                          artifact_bytes=tiny_artifact.bytes)
    written = write_results(tmp_path / "results", [row])
    assert len(written) == 1 and written[0].parent.name == "device=local"
    df = read_results(tmp_path / "results")
    assert list(df.columns) == RESULTS_SCHEMA.names and len(df) == 1
    got = df.iloc[0]
    assert got["schema_version"] == SCHEMA_VERSION and got["study"] == "study-a"
    assert got["trial"] == 4 and not got["reference"] and pd.isna(got["error"])
    np.testing.assert_array_equal(got["latencies_ms"], r["latencies_ms"])
    assert got["runs"] == len(r["latencies_ms"]) and got["p50_ms"] == r["p50_ms"]
    assert got["p50_ci_low_ms"] == r["p50_ci_low_ms"] and got["ci_level"] == 0.95
    assert got["artifact_hash"] == tiny_artifact.digest and got["artifact_bytes"] == tiny_artifact.bytes
    assert got["model_name"] == "tiny" and got["compressor"] == "none" and got["macs"] == r["macs"]
    assert got["energy_kind"] == "estimated" and pd.isna(got["energy_per_inference_mj"])
    assert got["estimated_energy_mj"] > 0
    assert got["agent_version"] == r["agent_version"] and got["device_numpy"] == np.__version__
    assert got["started_at"] == pd.Timestamp(r["started_at"]) and str(got["started_at"].tz) == "UTC"
    assert got["threads"] == r["threads"] == 1 and list(got["affinity"]) == r["affinity"]
    # which runtime ran, loading, memory, CPU time and the time-based energy estimate
    for key in ("backend", "backend_version", "provider", "backend_file_sha256", "init_ms", "first_run_ms",
                "memory_peak_mb", "memory_init_mb", "memory_baseline_mb", "memory_method", "cpu_p50_ms",
                "process_cpu_ms"):
        assert got[key] == r[key] and r[key] is not None, key
    assert pd.isna(got["backend_note"])
    assert got["time_estimated_energy_mj"] == r["energy"]["time_estimated_energy_per_inference_mj"] > 0
    assert got["stated_power_w"] == 3.0


def test_partitions_are_declared_strings_and_any_name_round_trips(tmp_path: Path) -> None:
    rows = [_row(study="2024", device="edison/1 a"), _row(study="007", device="pi=4")]
    write_results(tmp_path, rows)
    assert (tmp_path / "study=2024").is_dir() and (tmp_path / "study=007").is_dir()
    df = read_results(tmp_path)
    assert pd.api.types.is_string_dtype(df["study"])  # not guessed as an integer from "2024"
    assert sorted(df["study"]) == ["007", "2024"] and sorted(df["device"]) == ["edison/1 a", "pi=4"]
    # The files hold no partition columns: the folders are the one source of those values.
    assert "study" not in pq.read_schema(_files(tmp_path)[0]).names


def test_appending_never_rewrites_existing_files(tmp_path: Path) -> None:
    first = write_results(tmp_path, [_row(), _row(device="dev-2")])
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in first}
    second = write_results(tmp_path, [_row(), _row()])
    assert set(first).isdisjoint(second) and len(second) == 1  # one partition: one new file
    for p, (ino, mtime, data) in stats.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) == (ino, mtime, data)
    assert len(read_results(tmp_path)) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]  # cleaned up


def test_parallel_writers_need_no_lock(tmp_path: Path) -> None:
    def writer(i: int) -> None:
        for _ in range(5):
            write_results(tmp_path, [_row(device=f"dev-{i % 2}")])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    df = read_results(tmp_path)
    assert len(df) == 20 and df["measurement_id"].is_unique
    assert len(_files(tmp_path)) == 20


def test_study_filter_and_empty_results(tmp_path: Path) -> None:
    write_results(tmp_path, [_row(study="a"), _row(study="b"), _row(study="b")])
    assert list(read_results(tmp_path, "b")["study"]) == ["b", "b"]
    none = read_results(tmp_path, "zzz")
    assert none.empty and list(none.columns) == RESULTS_SCHEMA.names
    (tmp_path / "empty").mkdir()
    assert read_results(tmp_path / "empty").empty


def test_a_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match=r"no results dataset at .*nowhere"):
        read_results(tmp_path / "nowhere")


def test_a_dead_writers_staging_files_are_invisible(tmp_path: Path) -> None:
    write_results(tmp_path, [_row()])
    stale = tmp_path / ".staging-dead" / "study=s1" / "device=dev-1"
    stale.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([_row()], schema=RESULTS_SCHEMA), stale / "part-x.parquet")
    assert len(read_results(tmp_path)) == 1


@pytest.mark.parametrize(("bad", "message"), [
    ({"colour": "red"}, "not in RESULTS_SCHEMA"),
    ({"artifact_hash": None}, "required"),
    ({"energy_kind": "guessed"}, "energy_kind"),
    ({"p50_ms": "fast"}, "do not fit"),
    ({"device": ""}, "non-empty"),
])
def test_rows_that_break_the_schema_are_refused_and_nothing_is_written(
    tmp_path: Path, bad: dict[str, Any], message: str
) -> None:
    row = {**_row(), **bad}
    with pytest.raises(ResultsError, match=message):
        write_results(tmp_path / "r", [_row(), row])
    assert not (tmp_path / "r").exists() or not _files(tmp_path / "r")


def test_failures_are_rows_and_are_not_mistaken_for_measurements(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="failure_row"):
        measurement_row({"ok": False, "kind": "artifact_corrupt", "error": "bad hash"},
                        study="s", device="d", device_class="c")
    with pytest.raises(ResultsError, match="non-empty error"):
        failure_row(study="s", device="d", device_class="c", artifact_hash="h", error="")
    write_results(tmp_path, [failure_row(study="s", device="d", device_class="c",
                                         artifact_hash="h", error="device unreachable",
                                         arch="aarch64", reference=True)])
    got = read_results(tmp_path).iloc[0]
    assert got["error"] == "device unreachable" and got["arch"] == "aarch64" and got["reference"]
    assert pd.isna(got["p50_ms"]) and got["latencies_ms"] is None and pd.isna(got["trial"])


def test_timestamps_are_utc_and_must_carry_a_time_zone() -> None:
    with pytest.raises(ResultsError, match="time zone"):
        failure_row(study="s", device="d", device_class="c", artifact_hash="h", error="e",
                    started_at="2026-01-01T00:00:00")
    row = failure_row(study="s", device="d", device_class="c", artifact_hash="h", error="e",
                      started_at="2026-01-01T01:00:00+01:00")
    assert row["started_at"] == dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def test_version_1_files_without_drift_read_back_with_null_drift(tmp_path: Path) -> None:
    root = tmp_path / "results"
    write_results(root, [_row(drift=0.04)])
    # A file as SCHEMA_VERSION 1 wrote it: no drift column, schema_version 1.
    old = RESULTS_SCHEMA.remove(RESULTS_SCHEMA.get_field_index("drift"))
    row = {k: v for k, v in _row(measurement_id="old").items() if k != "drift"}
    row["schema_version"] = 1
    part = root / "study=s1" / "device=dev-1" / "part-v1.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=old).drop_columns(["study", "device"]),
                   part)
    frame = read_results(root)
    assert list(frame.columns) == RESULTS_SCHEMA.names
    df = frame.set_index("measurement_id")
    assert df.loc["old", "schema_version"] == 1 and pd.isna(df.loc["old", "drift"])
    new = df[df.index != "old"].iloc[0]
    assert new["schema_version"] == SCHEMA_VERSION and new["drift"] == pytest.approx(0.04)
    # the upgrade that did it is the one in UPGRADES (the report reads through it too)
    assert readable(1) and 1 in UPGRADES and not readable(0)


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1])
def test_rows_of_a_version_without_an_upgrade_are_refused(tmp_path: Path, version: int) -> None:
    """read_results used to return rows of a newer (or unknown older) version as if current,
    while the report refused them: both now refuse, with the version and what to do."""
    write_results(tmp_path, [_row(), _row(schema_version=version)])
    fix = "upgrade deepfleet" if version > SCHEMA_VERSION else "knows no upgrade from 0"
    with pytest.raises(ResultsError, match=rf"holds rows of schema version {version}.*{fix}"):
        read_results(tmp_path)
    assert len(read_results(tmp_path, "other-study")) == 0  # other studies stay readable


def test_a_version_2_dataset_written_by_that_code_reads_back_upgraded(tmp_path: Path) -> None:
    """tests/orchestrator/data/results-v2: a real dataset written by deepfleet at schema version
    2 (see the README there), read through UPGRADES next to rows of today."""
    root = tmp_path / "results"
    shutil.copytree(DATA / "results-v2", root)
    write_results(root, [_row(study="v2", backend="onnxruntime", backend_version="1.32.0",
                              memory_peak_mb=5.0, init_ms=3.0)])
    assert SCHEMA_VERSION == 4 and set(UPGRADES) == {1, 2, 3}
    frame = read_results(root, "v2")
    assert list(frame.columns) == RESULTS_SCHEMA.names and len(frame) == 2
    old = frame.loc[frame["schema_version"] == 2].iloc[0]
    assert old["agent_version"] == "0.3.1" and old["p50_ms"] > 0 and len(old["latencies_ms"]) == 8
    # the upgrade: a numpy row of an agent before 0.4.0 ran in the device's numpy
    assert old["backend"] == "numpy" and old["backend_version"] == old["device_numpy"]
    for column in ("provider", "init_ms", "memory_peak_mb", "cpu_p50_ms", "time_estimated_energy_mj",
                   "sensing_energy_mj", "sensing_basis"):
        assert pd.isna(old[column])  # not recorded then: null, never invented
    new = frame.loc[frame["schema_version"] == SCHEMA_VERSION].iloc[0]
    assert new["backend_version"] == "1.32.0" and new["memory_peak_mb"] == 5.0
    assert pd.api.types.is_float_dtype(frame["memory_peak_mb"]) and pd.api.types.is_string_dtype(frame["backend"])
    # the search's metrics read the upgraded rows like any other
    from deepfleet import metrics

    rows = plain_rows(frame.loc[frame["error"].isna()])
    assert metrics.class_value("latency_p50", rows, "x86_64") is None  # the old row is class 'local'
    assert metrics.class_value("latency_p50", rows, "local") == pytest.approx(old["p50_ms"])


def test_version_3_files_without_sensing_energy_read_back_with_nulls(tmp_path: Path) -> None:
    root = tmp_path / "results"
    sensing = ("sensing_energy_mj", "sensing_basis")
    old = RESULTS_SCHEMA
    for name in sensing:
        old = old.remove(old.get_field_index(name))
    row = {k: v for k, v in _row(measurement_id="v3").items() if k not in sensing}
    row["schema_version"] = 3
    part = root / "study=s1" / "device=dev-1" / "part-v3.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=old).drop_columns(["study", "device"]), part)
    write_results(root, [_row(sensing_energy_mj=7.9, sensing_basis="estimated from datasheet power")])
    df = read_results(root).set_index("measurement_id")
    assert pd.isna(df.loc["v3", "sensing_energy_mj"]) and pd.isna(df.loc["v3", "sensing_basis"])
    assert df[df.index != "v3"].iloc[0]["sensing_energy_mj"] == 7.9
