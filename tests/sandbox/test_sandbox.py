"""The sandbox fleet: real devices in namespaces, foreign roots, shaped links, simulated power.

Needs root (namespaces, chroot, cgroups); the ``sandbox`` fixture skips without it. As root,
a device kind that was skipped is a failure: the fixture asked for it and this machine can
build it once scripts/system-deps.sh has run.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from deepfleet.errors import ConfigError, DeviceError
from deepfleet.orchestrator.fleet import Device, load_fleet
from deepfleet.orchestrator.ssh import SSHTransport, Timeouts
from deepfleet.orchestrator.transport import open_transport
from deepfleet.sandbox import (
    SandboxState,
    cut_link,
    down,
    heal_link,
    read_state,
    start_device,
    stop_device,
    up,
)
from deepfleet.sandbox._proc import sh
from deepfleet.sandbox._state import load
from tests.conftest import sandbox_missing
from tests.orchestrator.test_transport_contract import ECHO

FAST = Timeouts(connect=2, banner=2, auth=2, channel_open=2, kill=2, reconnect_delays=(0.2,))
MACHINE = {"x86-1": "x86_64", "x86-slow-1": "x86_64", "edison-1": "i686", "arm64-1": "aarch64"}


def device(sandbox: SandboxState, name: str) -> Device:
    """The fleet entry of a sandbox device; a skipped one fails the test (we are root here)."""
    if name in sandbox.skipped:
        pytest.fail(f"sandbox skipped {name} although running as root: {sandbox.skipped[name]}")
    return load_fleet(sandbox.fleet_file)[name]


@pytest.mark.parametrize("name", list(MACHINE))
def test_device_reports_its_architecture_over_ssh(sandbox: SandboxState, name: str) -> None:
    d = device(sandbox, name)
    with open_transport(d) as t:
        assert t.run(["uname", "-m"]).strip() == MACHINE[name]
        out = t.run([d.python, "-c", "import platform, numpy; print(platform.machine(), "
                                      "numpy.ones(3).sum())"], timeout=120)
    assert out.split() == [MACHINE[name], "3.0"]


@pytest.mark.parametrize("name", list(MACHINE))
def test_agent_like_process_runs_on_every_device(sandbox: SandboxState, name: str,
                                                 tmp_path: Path) -> None:
    d = device(sandbox, name)
    script = tmp_path / "echo_agent.py"
    script.write_text(ECHO)
    with open_transport(d) as t:
        uploaded = t.upload_if_changed(script, f"{d.workdir}/echo_agent.py")
        assert uploaded.path.endswith("/echo_agent.py") and "~" not in uploaded.path
        assert not t.upload_if_changed(script, f"{d.workdir}/echo_agent.py").uploaded
        with t.start([d.python, "-u", uploaded.path], timeout=60) as proc:
            assert proc.request({"op": "hello"}, timeout=60) == {"echo": {"op": "hello"}}


def test_fleet_file_says_what_is_simulated(sandbox: SandboxState) -> None:
    edison, arm64, x86 = (device(sandbox, n) for n in ("edison-1", "arm64-1", "x86-1"))
    assert edison.device_class == "edison" and edison.energy.source == "hwmon"
    assert edison.energy.path == "/var/lib/deepfleet/sim-hwmon/hwmon0"
    assert edison.simulated is not None and "0.15 CPU" in edison.simulated
    assert edison.energy.simulated is not None and "SIMULATED" in edison.energy.simulated
    assert arm64.simulated is not None and "qemu" in arm64.simulated
    assert arm64.energy.simulated is None  # an emulated CPU is not a simulated sensor
    assert x86.simulated is None and x86.energy.source == "none"
    assert x86.known_hosts is not None and x86.known_hosts.read_text().count("ssh-ed25519") == 4


def test_edison_cpu_is_capped(sandbox: SandboxState) -> None:
    d = device(sandbox, "edison-1")
    busy = ("import time\nw0, c0 = time.time(), time.process_time()\n"
            "while time.time() - w0 < 1.0: pass\n"
            "print((time.process_time() - c0) / (time.time() - w0))")
    with open_transport(d) as t:
        share = float(t.run([d.python, "-c", busy], timeout=60))
    assert 0.05 < share < 0.35  # quota 0.15 CPU (one busy thread gets all of it)


def _power_samples(state: SandboxState, count: int) -> list[float]:
    """``count`` readings of the edison's sensor in watts, 0.1 s apart (read on this machine,
    so that reading does not itself load the device)."""
    (edison,) = (d for d in state.devices if d.name == "edison-1")
    assert edison.power_dir is not None
    samples = []
    for _ in range(count):
        time.sleep(0.1)
        samples.append(int(Path(edison.power_dir, "power1_input").read_text()) / 1e6)
    return samples


def test_simulated_power_rises_under_load(sandbox: SandboxState) -> None:
    d = device(sandbox, "edison-1")
    with open_transport(d) as t:
        seen = t.run(["cat", f"{d.energy.path}/name", f"{d.energy.path}/power1_label"])
        assert seen.split() == ["deepfleet_sim", "simulated"]
        time.sleep(0.6)  # let the sensor's 0.3 s window forget our ssh session
        idle = min(_power_samples(sandbox, 5))
        with t.start([d.python, "-c", "while True: pass"]) as load:
            time.sleep(0.8)
            busy = max(_power_samples(sandbox, 8))
            assert load.poll() is None
    assert idle == pytest.approx(0.35, abs=0.1)
    assert busy > idle + 0.3  # 0.65 W more at full use of its CPU quota


def test_slow_link_is_slow(sandbox: SandboxState) -> None:
    payload = os.urandom(384 * 1024)
    times = {}
    for name in ("x86-1", "x86-slow-1"):
        with open_transport(device(sandbox, name)) as t:
            t.run(["true"])  # connect first: time only the transfer
            start = time.monotonic()
            assert t.run(["wc", "-c"], stdin=payload, timeout=60).strip() == str(len(payload))
            times[name] = time.monotonic() - start
    assert times["x86-slow-1"] > 1.2  # 2 Mbit/s: 384 KiB need at least 1.5 s, whatever the load
    assert times["x86-1"] < times["x86-slow-1"] / 2  # it is the link, not a busy machine


def test_cut_link_times_out_naming_the_device_then_recovers(sandbox: SandboxState) -> None:
    t = SSHTransport(device(sandbox, "x86-1"), timeouts=FAST)
    assert t.run(["echo", "up"]) == "up\n"
    cut_link("x86-1", state_dir=sandbox.directory)
    try:
        start = time.monotonic()
        with pytest.raises(DeviceError, match=r"device 'x86-1'.*no answer within 2 s"):
            t.run(["echo", "lost"], timeout=2)
        assert time.monotonic() - start < 4
        start = time.monotonic()
        with pytest.raises(DeviceError, match=r"device 'x86-1'.*no answer.*while connecting"):
            t.run(["echo", "lost"], timeout=10)  # reconnecting: bounded by the connect timeout
        assert time.monotonic() - start < 4
    finally:
        heal_link("x86-1", state_dir=sandbox.directory)
    assert t.run(["echo", "healed"]) == "healed\n"
    t.close()


def test_link_down_fails_fast_through_the_unreachable_route(sandbox: SandboxState) -> None:
    d = device(sandbox, "x86-1")
    raw = load(sandbox.directory)
    assert raw is not None
    (rec,) = (r for r in raw["devices"] if r["name"] == "x86-1")
    host_if = rec["netns"]["host_if"]
    sh(["ip", "link", "set", host_if, "down"])
    try:
        start = time.monotonic()
        with pytest.raises(DeviceError, match="device 'x86-1'.*cannot connect: No route to host"), \
                SSHTransport(d, timeouts=FAST) as t:
            t.run(["true"])
        assert time.monotonic() - start < 1.0  # refused by the route, not a timeout
    finally:
        sh(["ip", "link", "set", host_if, "up"])
    with SSHTransport(d, timeouts=FAST) as t:
        assert t.run(["echo", "ok"], timeout=10) == "ok\n"


def test_stopped_device_refuses_then_comes_back(sandbox: SandboxState) -> None:
    t = SSHTransport(device(sandbox, "x86-1"), timeouts=FAST)
    assert t.run(["true"]) == ""
    stop_device("x86-1", state_dir=sandbox.directory)
    try:
        with pytest.raises(DeviceError, match="device 'x86-1'"):
            t.run(["true"], timeout=5)
    finally:
        start_device("x86-1", state_dir=sandbox.directory)
    assert t.run(["echo", "back"]) == "back\n"
    t.close()


def _namespaces() -> set[str]:
    return set(re.findall(r"^(\S+)", sh(["ip", "netns", "list"]).stdout, re.M))


def test_down_removes_everything(tmp_path: Path, sandbox_cache: Path) -> None:
    if (why := sandbox_missing()):
        pytest.skip(why)
    fleet = up(["x86", "edison"], state_dir=tmp_path)
    raw = load(tmp_path)
    assert raw is not None and fleet.exists()
    recs = {r["name"]: r for r in raw["devices"]}
    edison = recs["edison-1"]
    names = {r["netns"]["name"] for r in recs.values()}
    pids = [r["sshd"]["pid"] for r in recs.values()] + [edison["power_pid"]]
    assert names <= _namespaces()
    assert edison["mounts"] and all(Path(p).is_dir() for p in edison["cgroup"]["dirs"])
    down(tmp_path)
    assert not names & _namespaces()
    assert not [m for m in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in m]
    assert not any(Path(p).exists() for p in edison["cgroup"]["dirs"])
    time.sleep(0.2)
    alive = [p for p in pids if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().split(") ")[1][0] != "Z"]
    assert alive == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert read_state(tmp_path) is None
    down(tmp_path)  # idempotent


def test_loopback_mode_falls_back_and_says_what_it_skipped(tmp_path: Path,
                                                           sandbox_cache: Path) -> None:
    if (why := sandbox_missing()):
        pytest.skip(why)
    lines: list[str] = []
    fleet = load_fleet(up(["x86", "edison"], state_dir=tmp_path, loopback=True,
                          echo=lines.append))
    try:
        state = read_state(tmp_path)
        assert state is not None
        assert [(d.name, d.mode, d.host) for d in state.devices] == [("x86-1", "loopback",
                                                                       "127.0.0.1")]
        assert "network namespaces" in state.skipped["edison-1"]
        assert any(line.startswith("skipped edison-1: needs network namespaces")
                   for line in lines)
        with open_transport(fleet["x86-1"]) as t:
            assert t.run([fleet["x86-1"].python, "-c", "print(6*7)"]) == "42\n"
    finally:
        down(tmp_path)


def test_unknown_kind_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown device kind 'pdp11'.*x86, x86-slow, edison"):
        up(["pdp11"], state_dir=tmp_path)
    assert sys.executable  # the error came before anything was started
    assert not (tmp_path / "state.json").exists()
