"""SSH-specific behaviour against real sshd servers: host-key trust, auth, refusals, restarts."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from deepfleet.errors import ConfigError, DeviceError
from deepfleet.orchestrator.ssh import SSHTransport, Timeouts
from deepfleet.sandbox import LoopbackSshd
from deepfleet.sandbox._sshd import free_port, keygen
from tests.conftest import DeviceFor

FAST = Timeouts(connect=3, banner=3, auth=3, channel_open=3, kill=3,
                reconnect_delays=(0.1, 0.2, 0.4))


def test_connects_lazily_and_reuses_one_connection(sshd_server: LoopbackSshd,
                                                   device_for: DeviceFor) -> None:
    t = SSHTransport(device_for(sshd_server))
    assert t._client is None  # nothing happens before the first use
    assert t.run(["echo", "hi"]) == "hi\n"
    first = t._client
    assert t.run(["true"]) == "" and t._client is first
    t.close()
    assert t._client is None
    assert t.run(["echo", "again"]) == "again\n"  # reconnects after close
    t.close()


def test_fingerprint_trust_accepts_the_right_key(sshd_server: LoopbackSshd,
                                                 device_for: DeviceFor) -> None:
    with SSHTransport(device_for(sshd_server, trust="fingerprint")) as t:
        assert t.run(["echo", "ok"]) == "ok\n"


def test_unknown_host_key_is_refused_with_keyscan_hint(sshd_server: LoopbackSshd,
                                                       device_for: DeviceFor,
                                                       tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    device = device_for(sshd_server, known_hosts=empty)
    with pytest.raises(DeviceError) as info, SSHTransport(device, timeouts=FAST) as t:
        t.run(["true"])
    message = str(info.value)
    assert "is not in known_hosts" in message and "Refusing" in message
    assert f"ssh-keyscan -p {sshd_server.port} -t ed25519 127.0.0.1 >> {empty}" in message
    assert empty.read_text() == ""  # never trusted automatically


def test_changed_host_key_is_refused_as_mismatch(sshd_server: LoopbackSshd,
                                                 device_for: DeviceFor,
                                                 tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key", "impostor")
    known = tmp_path / "kh_wrong"
    known.write_text(f"[127.0.0.1]:{sshd_server.port} {other}\n")
    with pytest.raises(DeviceError, match="host key MISMATCH.*ssh-keygen -R"), \
            SSHTransport(device_for(sshd_server, known_hosts=known), timeouts=FAST) as t:
        t.run(["true"])


def test_wrong_fingerprint_is_refused_and_the_right_one_shown(sshd_server: LoopbackSshd,
                                                              device_for: DeviceFor) -> None:
    right = device_for(sshd_server, trust="fingerprint").host_key
    wrong = "SHA256:" + "B" * 43
    device = device_for(sshd_server, trust="fingerprint", host_key=wrong)
    with pytest.raises(DeviceError) as info, SSHTransport(device, timeouts=FAST) as t:
        t.run(["true"])
    assert f"fleet.yaml says host_key: {wrong}" in str(info.value)
    assert f"host_key: {right}" in str(info.value)


def test_wrong_user_is_an_authentication_error(sshd_server: LoopbackSshd,
                                               device_for: DeviceFor) -> None:
    device = device_for(sshd_server, user="nosuchuser")
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"device 'loop'.*authentication refused for user "
                                          r"'nosuchuser'"), SSHTransport(device) as t:
        t.run(["true"])
    assert time.monotonic() - start < 5  # not retried: retrying cannot help


def test_wrong_key_is_an_authentication_error(sshd_server: LoopbackSshd, device_for: DeviceFor,
                                              tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    keygen(stranger, "stranger")
    with pytest.raises(DeviceError, match=f"authentication refused.*{stranger}"), \
            SSHTransport(device_for(sshd_server, key=stranger)) as t:
        t.run(["true"])


def test_unreadable_key_is_a_config_error(sshd_server: LoopbackSshd, device_for: DeviceFor,
                                          tmp_path: Path) -> None:
    junk = tmp_path / "junk_key"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError, match="cannot load key"), \
            SSHTransport(device_for(sshd_server, key=junk)) as t:
        t.run(["true"])


def test_connection_refused_names_device_after_backoff(sshd_server: LoopbackSshd,
                                                       device_for: DeviceFor) -> None:
    device = dataclasses.replace(device_for(sshd_server), port=free_port())
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"device 'loop'.*connection refused.*after 4 attempts"), \
            SSHTransport(device, timeouts=FAST) as t:
        t.run(["true"])
    assert 0.6 < time.monotonic() - start < 5  # backed off 0.1 + 0.2 + 0.4 s, then gave up


def test_sshd_killed_mid_request_then_reconnects_after_restart(sshd_server: LoopbackSshd,
                                                               device_for: DeviceFor) -> None:
    t = SSHTransport(device_for(sshd_server), timeouts=FAST)
    assert t.run(["echo", "before"]) == "before\n"
    killer = threading.Timer(0.5, sshd_server.kill)
    killer.start()
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"device 'loop'.*(connection lost|no answer)"):
        t.run(["sleep", "20"], timeout=30)
    assert time.monotonic() - start < 5
    with pytest.raises(DeviceError, match="connection refused"):
        t.run(["true"])  # still down
    sshd_server.start()
    assert t.run(["echo", "after"]) == "after\n"
    t.close()


def test_reconnect_waits_for_a_device_that_comes_back(sshd_server: LoopbackSshd,
                                                      device_for: DeviceFor) -> None:
    t = SSHTransport(device_for(sshd_server), timeouts=Timeouts(
        reconnect_delays=(0.25, 0.5, 1.0, 2.0)))
    assert t.run(["true"]) == ""
    sshd_server.kill()
    threading.Timer(0.6, sshd_server.start).start()  # "reboots" while we back off
    assert t.run(["echo", "back"], timeout=10) == "back\n"
    t.close()
