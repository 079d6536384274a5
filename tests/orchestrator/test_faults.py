"""Faults and bad input against real sshd devices: nothing mocked.

Each fault must give an error naming the device and the cause, leave the rows already written
in Parquet, and let the session measure again once the device is back. Timeouts are short
(``fast_session``) so that each test takes seconds.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deepfleet.artifact import Artifact
from deepfleet.errors import DeviceError
from deepfleet.orchestrator.check import check_devices
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device, load_fleet
from deepfleet.orchestrator.measure import MeasureSettings, Outcome, measure_many
from deepfleet.orchestrator.results import read_results
from deepfleet.sandbox import LoopbackSshd, SandboxState, cut_link, heal_link
from deepfleet.sandbox._sshd import keygen
from tests.conftest import QUICK_REQUEST, DeviceFor

Factory = Callable[[Device], DeviceSession]
QUICK = MeasureSettings(request=QUICK_REQUEST, reference_every=0)
# Long enough to be interrupted half-way: 1.5 s of runs whatever the model's speed.
LONG = MeasureSettings(request={**QUICK_REQUEST, "min_runs": 5, "max_runs": 10**6,
                                "min_seconds": 1.5, "max_seconds": 1.5}, reference_every=0)


def _after_first(action: Callable[[], None], delay: float) -> Callable[[Outcome], None]:
    """An on_outcome hook that runs ``action`` ``delay`` s after the first outcome, i.e. while
    the second artifact is being measured."""
    fired: list[threading.Timer] = []

    def hook(_: Outcome) -> None:
        if not fired:
            fired.append(threading.Timer(delay, action))
            fired[0].start()

    return hook


def _gone(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_whole_device_killed_mid_measurement_then_back(
        sshd_server: LoopbackSshd, device_for: DeviceFor, tiny_artifact: Artifact,
        tmp_path: Path, fast_session: Factory) -> None:
    root = tmp_path / "results"
    sessions: dict[str, DeviceSession] = {}
    try:
        outcomes = measure_many([device_for(sshd_server)], [tiny_artifact.path] * 3,
                                results_root=root, settings=LONG, sessions=sessions,
                                session_factory=fast_session,
                                on_outcome=_after_first(sshd_server.kill, 0.5))
        first, killed, after = outcomes
        assert first.ok, first.error
        assert not killed.ok and "device 'loop'" in (killed.error or "")
        assert any(w in (killed.error or "") for w in ("ended", "connection lost", "stream broke"))
        assert not after.ok and "connection refused" in (after.error or "")
        df = read_results(root)
        assert len(df) == 3 and df["p50_ms"].notna().sum() == 1  # the good row stayed
        sshd_server.start()  # the device comes back: the same session measures again
        (again,) = measure_many([device_for(sshd_server)], [tiny_artifact.path],
                                results_root=root, settings=QUICK, sessions=sessions,
                                session_factory=fast_session)
        assert again.ok, again.error
        assert sessions["loop"].connects == 2 and len(read_results(root)) == 4
    finally:
        for s in sessions.values():
            s.close()


def test_hung_agent_times_out_is_killed_and_replaced(
        sshd_server: LoopbackSshd, device_for: DeviceFor, tiny_artifact: Artifact,
        fast_session: Factory) -> None:
    request = {**QUICK_REQUEST, "max_seconds": 0.5}
    with fast_session(device_for(sshd_server)) as session:
        assert session.measure(tiny_artifact.path, request)["ok"]
        pid = int(session.hello["pid"])
        os.kill(pid, signal.SIGSTOP)  # alive, holding its channel, answering nothing
        start = time.monotonic()
        with pytest.raises(DeviceError, match=r"device 'loop'.*did not answer a 'measure' "
                                              r"request within"):
            session.measure(tiny_artifact.path, request)
        assert time.monotonic() - start < 10  # 0.5 s of runs + 2 s margin, then the kill
        assert _gone(pid)  # killed through a second channel, not left stopped on the device
        assert session.measure(tiny_artifact.path, request)["ok"]
        assert int(session.hello["pid"]) != pid and session.connects == 2


def test_corrupt_artifact_on_the_device_is_refused_and_uploaded_again(
        sshd_server: LoopbackSshd, device_for: DeviceFor, tiny_artifact: Artifact,
        fast_session: Factory) -> None:
    device = device_for(sshd_server)
    with fast_session(device) as session:
        first = session.measure(tiny_artifact.path, QUICK_REQUEST)
        assert first["ok"] and session.uploads == 4  # graph, weights, manifest, model.onnx: first sight
        remote = Path(device.workdir) / "artifacts" / tiny_artifact.digest / "weights.npz"
        data = bytearray(remote.read_bytes())
        data[-40] ^= 0xFF  # one flipped byte: same size, different hash
        remote.write_bytes(bytes(data))
        again = session.measure(tiny_artifact.path, QUICK_REQUEST)
        assert again["ok"] and not again["model_cached"]
        assert session.uploads == 5  # only the damaged file went again
        assert remote.read_bytes() == (tiny_artifact.path / "weights.npz").read_bytes()


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("unknown_host_key", r"host key of \[127\.0\.0\.1\]:\d+ .* is not in known_hosts .* Refusing"),
        ("wrong_user", r"authentication refused for user 'nosuchuser'"),
        ("wrong_key", r"authentication refused for user .* with key .*stranger"),
        ("no_numpy", r"the interpreter '.*venv-no-numpy.*/bin/python' has no numpy"),
        ("no_python", r"exited with status 127"),
    ],
)
def test_bad_device_settings_fail_with_device_and_cause(
        fault: str, expected: str, sshd_server: LoopbackSshd, device_for: DeviceFor,
        tiny_artifact: Artifact, tmp_path: Path, python_without_numpy: str,
        fast_session: Factory) -> None:
    overrides: dict[str, object] = {}
    if fault == "unknown_host_key":
        (tmp_path / "empty").write_text("")
        overrides["known_hosts"] = tmp_path / "empty"
    elif fault == "wrong_user":
        overrides["user"] = "nosuchuser"
    elif fault == "wrong_key":
        keygen(tmp_path / "stranger", "stranger")
        overrides["key"] = tmp_path / "stranger"
    elif fault == "no_numpy":
        overrides["python"] = python_without_numpy
    else:
        overrides["python"] = "/no/such/python3"
    device = device_for(sshd_server, **overrides)
    root = tmp_path / "results"
    (outcome,) = measure_many([device], [tiny_artifact.path], results_root=root, settings=QUICK,
                              session_factory=fast_session)
    assert not outcome.ok and outcome.rows_written == 1
    assert outcome.error is not None and outcome.error.startswith("device 'loop'")
    assert re.search(expected, outcome.error), outcome.error
    (check,) = check_devices([device], session_factory=fast_session)
    assert not check.reachable and check.error is not None and re.search(expected, check.error)
    df = read_results(root)
    assert df["error"].tolist() == [outcome.error] and df["device"].tolist() == ["loop"]


def _sandbox_device(sandbox: SandboxState, name: str) -> Device:
    if name in sandbox.skipped:
        pytest.fail(f"sandbox skipped {name} although running as root: {sandbox.skipped[name]}")
    return load_fleet(sandbox.fleet_file)[name]


def test_cut_link_mid_measurement_then_healed(sandbox: SandboxState, tiny_artifact: Artifact,
                                              tmp_path: Path, fast_session: Factory) -> None:
    device = _sandbox_device(sandbox, "x86-1")
    root = tmp_path / "results"
    sessions: dict[str, DeviceSession] = {}
    # A short measurement keeps the reply deadline (runs + 2 x min_seconds + margin) short.
    settings = MeasureSettings(request={**LONG.request, "min_seconds": 0.6, "max_seconds": 0.6},
                               reference_every=0)
    try:
        start = time.monotonic()
        outcomes = measure_many(
            [device], [tiny_artifact.path] * 3, results_root=root, settings=settings,
            sessions=sessions, session_factory=fast_session,
            on_outcome=_after_first(lambda: cut_link("x86-1", state_dir=sandbox.directory), 0.2))
        took = time.monotonic() - start
        first, cut, after = outcomes
        assert first.ok, first.error
        assert not cut.ok and "device 'x86-1'" in (cut.error or "")
        assert "did not answer a 'measure' request" in (cut.error or "")
        assert not after.ok and "device 'x86-1'" in (after.error or "")
        assert took < 30  # bounded by the deadlines, not by TCP's minutes
        assert read_results(root)["p50_ms"].notna().sum() == 1
    finally:
        heal_link("x86-1", state_dir=sandbox.directory)
    try:
        (again,) = measure_many([device], [tiny_artifact.path], results_root=root,
                                settings=QUICK, sessions=sessions, session_factory=fast_session)
        assert again.ok, again.error
        assert len(read_results(root)) == 4
    finally:
        for s in sessions.values():
            s.close()


def test_simulated_sensor_rows_say_simulated(sandbox: SandboxState, tiny_artifact: Artifact,
                                             tmp_path: Path, fast_session: Factory) -> None:
    edison = _sandbox_device(sandbox, "edison-1")
    assert edison.energy.simulated is not None
    # No "energy" in the request: the fleet file's settings (the simulated sensor) apply.
    request = {k: v for k, v in QUICK_REQUEST.items() if k != "energy"}
    request.update(max_runs=10**6, min_seconds=1.0, max_seconds=2.0)
    (o,) = measure_many([edison], [tiny_artifact.path], results_root=tmp_path / "r",
                        settings=MeasureSettings(request=request, reference_every=0),
                        session_factory=fast_session)
    assert o.ok, o.error
    assert o.energy_kind == "simulated" and o.energy_source == "hwmon"
    assert o.energy_mj is not None and o.energy_mj > 0
    row = read_results(tmp_path / "r").iloc[0]
    assert row["energy_kind"] == "simulated" and row["arch"] == "i686"
    assert edison.energy.simulated in row["simulated"] and "0.15 CPU" in row["simulated"]
    (check,) = check_devices([edison], session_factory=fast_session)
    assert check.reachable and check.energy is not None and check.energy.startswith("hwmon")
    assert check.simulated is not None and edison.energy.simulated in check.simulated
