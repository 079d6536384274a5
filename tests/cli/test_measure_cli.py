"""``deepfleet measure`` and ``deepfleet fleet check`` through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deepfleet.artifact import Artifact
from deepfleet.cli import main
from deepfleet.orchestrator.results import read_results
from deepfleet.sandbox import LoopbackSshd
from tests.conftest import DeviceFor

QUICK = ["--runs", "5", "--reference-every", "0"]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local device deploys its agent to ~/.deepfleet: keep that inside the test."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _fleet_file(tmp_path: Path, devices: list[dict[str, object]]) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"devices": devices}))
    return path


def _entry(device_for: DeviceFor, server: LoopbackSshd, name: str, **overrides: object) -> dict:
    d = device_for(server, **overrides)
    return {"name": name, "host": d.host, "port": d.port, "user": d.user, "key": str(d.key),
            "known_hosts": str(d.known_hosts), "class": "x86", "python": d.python,
            "workdir": d.workdir}


def test_measure_json_prints_one_object_per_device_and_artifact(tiny_artifact: Artifact,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["measure", str(tiny_artifact.path), "--runs", "5",
                                       "--reference-every", "1", "--out", str(out), "--json",
                                       "--study", "cli"])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()  # the reference is a row, not a line
    got = json.loads(line)
    for key in ("device", "artifact", "p50_ms", "p90_ms", "p99_ms", "energy_mj", "energy_source",
                "energy_kind", "estimated_energy_mj", "time_estimated_energy_mj", "backend",
                "backend_note", "cpu_p50_ms", "init_ms", "memory_peak_mb", "rows_written", "error"):
        assert key in got
    assert got["device"] == "local" and got["artifact"] == str(tiny_artifact.path)
    assert got["rows_written"] == 1 and got["error"] is None and got["p50_ms"] > 0
    assert got["drift"] == 0.0
    df = read_results(out, study="cli")
    assert sorted(df["reference"]) == [False, True] and (df["device"] == "local").all()


def test_measure_text_says_what_was_written(tiny_artifact: Artifact, tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["measure", str(tiny_artifact.path), *QUICK,
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    first, last = result.stdout.splitlines()
    assert first.startswith(f"local  {tiny_artifact.digest[:12]}  onnxruntime  p50 ")  # auto's pick here
    assert " ms (CPU " in first and "  init " in first and " MiB" in first
    assert "mJ (estimated from operation counts)" in first and "no time-based estimate" in first
    assert last == f"1 of 1 measurement(s) succeeded; 1 row(s) in {out} (study 'measure')"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/no/such/artifact"], "artifact '/no/such/artifact' does not exist"),
        (["ART", "--devices", "pi-9"], "no device named 'pi-9'; known devices: local"),
        (["ART", "--fleet", "BAD"], "not valid YAML"),
        (["ART", "--fleet", "MISSING"], "cannot read the fleet file"),
        (["ART", "--devices", ","], "--devices: got ',', an empty list"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
        args: list[str], expected: str, tiny_artifact: Artifact, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [\n")
    subst = {"ART": str(tiny_artifact.path), "BAD": str(bad), "MISSING": str(tmp_path / "no.yaml")}
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["measure", *(subst.get(a, a) for a in args),
                                       "--out", str(out)])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("deepfleet: error: ") and expected in line
    assert result.stdout == "" and not out.exists()


def test_fleet_check_local_is_one_reachable_row() -> None:
    result = CliRunner().invoke(main, ["fleet", "check"])
    assert result.exit_code == 0, result.output
    header, rule, row, *folded = result.stdout.splitlines()  # long cells fold onto more lines
    assert header.split()[:7] == ["device", "class", "ok", "arch", "python", "runtimes", "auto"]
    assert "numpy " in row  # numpy and its version, always among the runtimes
    assert set(rule) == {"─"} and row.split()[0] == "local" and row.split()[2] == "yes"
    assert folded[-1].startswith("(runtimes: installed on the device")


def test_fleet_check_reports_every_device_and_names_each_failure(
        sshd_server: LoopbackSshd, device_for: DeviceFor, tmp_path: Path,
        python_without_numpy: str) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    fleet = _fleet_file(tmp_path, [
        _entry(device_for, sshd_server, "good"),
        _entry(device_for, sshd_server, "stranger", known_hosts=empty),
        {**_entry(device_for, sshd_server, "nonumpy"), "python": python_without_numpy},
    ])
    result = CliRunner().invoke(main, ["fleet", "check", "--fleet", str(fleet), "--json"])
    assert result.exit_code == 1
    rows = {r["device"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert list(rows) == ["good", "stranger", "nonumpy"]  # every device, in fleet order
    good = rows["good"]
    assert good["reachable"] and good["arch"] == "x86_64" and good["numpy"]
    assert good["energy"] == "none found (rapl, hwmon or power_supply): estimates only" or \
        good["energy"].startswith(("rapl", "hwmon", "power_supply"))
    assert not rows["stranger"]["reachable"] and not rows["nonumpy"]["reachable"]
    errors = result.stderr.splitlines()
    assert any("device 'stranger'" in e and "not in known_hosts" in e for e in errors)
    assert any("device 'nonumpy'" in e and "has no numpy" in e for e in errors)
    assert errors[-1] == "deepfleet: 2 of 3 device(s) unreachable: stranger, nonumpy"


def test_measure_backend_choice_on_a_fleet_of_two_kinds_of_device(
        sshd_server: LoopbackSshd, device_for: DeviceFor, tmp_path: Path, tiny_artifact: Artifact,
        python_without_onnxruntime: str) -> None:
    """Over SSH: a device with onnxruntime and one with numpy only. auto measures each in what it
    has (and says why it fell back); an explicit onnxruntime fails only on the device without it,
    with the fix; the time-based estimate is busy time x the stated power."""
    import sys

    fleet = _fleet_file(tmp_path, [
        {**_entry(device_for, sshd_server, "full"), "python": sys.executable, "power": {"active_w": 2.5}},
        {**_entry(device_for, sshd_server, "bare", workdir=str(tmp_path / "bare")),
         "python": python_without_onnxruntime},
    ])
    out = tmp_path / "results"
    base = ["measure", str(tiny_artifact.path), "--fleet", str(fleet), *QUICK, "--out", str(out), "--json"]
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0, result.output
    got = {r["device"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert got["full"]["backend"] == "onnxruntime" and got["full"]["backend_note"] is None
    assert got["bare"]["backend"] == "numpy"
    assert got["bare"]["backend_note"] == "auto: onnxruntime not installed on this device; numpy"
    assert got["full"]["time_estimated_energy_mj"] == pytest.approx(2.5 * got["full"]["p50_ms"])
    assert got["bare"]["time_estimated_energy_mj"] is None  # no power: stated for it
    df = read_results(out)
    full = df.loc[df["device"] == "full"].iloc[0]
    assert full["provider"] == "CPUExecutionProvider" and full["backend_version"]
    assert full["memory_peak_mb"] >= 0 and full["init_ms"] > 0 and full["stated_power_w"] == 2.5
    result = CliRunner().invoke(main, [*base, "--backend", "onnxruntime", "--study", "explicit"])
    assert result.exit_code == 1
    got = {r["device"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert got["full"]["error"] is None and got["full"]["backend"] == "onnxruntime"
    error = got["bare"]["error"]
    assert "device 'bare'" in error and "backend_unavailable" in error
    assert "install onnxruntime" in error and "'numpy'" in error
    rows = read_results(out, "explicit")
    assert rows.loc[rows["device"] == "bare", "error"].notna().all()
    assert rows.loc[rows["device"] == "full", "error"].isna().all()  # the other device's row is kept
