"""``deepfleet fleet sandbox up|down`` through the real command line (click's runner)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from deepfleet.cli import main
from deepfleet.orchestrator.fleet import load_fleet
from deepfleet.orchestrator.transport import open_transport
from deepfleet.sandbox._sshd import sshd_binary


def test_sandbox_up_prints_started_skipped_and_fleet_path_then_down(tmp_path: Path) -> None:
    if sshd_binary() is None:
        pytest.skip("sshd not installed (run scripts/system-deps.sh as root)")
    runner = CliRunner()
    result = runner.invoke(main, ["fleet", "sandbox", "up", "--devices", "x86,arm64",
                                  "--loopback", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("started x86-1") and "127.0.0.1:" in line for line in lines)
    assert any(line.startswith("skipped arm64-1: needs network namespaces") for line in lines)
    fleet_path = Path(lines[-1])
    assert fleet_path == tmp_path / "fleet.yaml"
    device = load_fleet(fleet_path)["x86-1"]
    with open_transport(device) as t:
        assert t.run(["echo", "via cli"]) == "via cli\n"
    result = runner.invoke(main, ["fleet", "sandbox", "down", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "stopped x86-1" in result.output
    assert not fleet_path.exists()


def test_unknown_kind_is_one_error_line_and_status_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["fleet", "sandbox", "up", "--devices", "vax",
                                       "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "deepfleet: error: sandbox: unknown device kind 'vax'; accepted: x86" in result.output
