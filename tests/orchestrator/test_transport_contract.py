"""The contract every Transport must keep, run against the local transport and a real sshd."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepfleet.errors import DeviceError
from deepfleet.orchestrator.fleet import LOCAL_DEVICE
from deepfleet.orchestrator.transport import LocalTransport, Transport, open_transport

# Awkward arguments that a shell would split, expand or execute if they were not quoted.
AWKWARD = ["a b", "it's", 'say "hi"', "$(touch /tmp/deepfleet-pwned)", "`id`", "x\ny", "*",
           "semi;colon", "", "back\\slash", "tab\there", "ünï"]

# A tiny JSON-lines echo server: the shape of the future device agent.
ECHO = (
    "import json, sys, time\n"
    "for line in sys.stdin:\n"
    "    req = json.loads(line)\n"
    "    if req.get('op') == 'hang':\n"
    "        time.sleep(3600)\n"
    "    if req.get('op') == 'exit':\n"
    "        sys.stderr.write('bye from echo\\n'); sys.exit(7)\n"
    "    print(json.dumps({'echo': req}), flush=True)\n"
)


@pytest.fixture(params=["local", "ssh"])
def transport(request: pytest.FixtureRequest) -> Iterator[Transport]:
    if request.param == "local":
        t: Transport = LocalTransport(LOCAL_DEVICE)
    else:
        server = request.getfixturevalue("sshd_server")
        device = request.getfixturevalue("device_for")(server, python=sys.executable)
        t = open_transport(device)
    with t:
        yield t


def test_awkward_argv_arrives_verbatim(transport: Transport) -> None:
    Path("/tmp/deepfleet-pwned").unlink(missing_ok=True)
    out = transport.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.argv[1:]))",
                         *AWKWARD])
    import json

    assert json.loads(out) == AWKWARD
    assert not Path("/tmp/deepfleet-pwned").exists()


def test_failure_names_device_command_status_and_stderr(transport: Transport) -> None:
    with pytest.raises(DeviceError) as info:
        transport.run(["sh", "-c", "echo out; echo 'it broke' >&2; exit 3"])
    message = str(info.value)
    assert repr(transport.device.name) in message
    assert "exited with status 3" in message and "it broke" in message and "'sh'" in message
    result = transport.execute(["sh", "-c", "exit 4"])
    assert result.exit_status == 4


def test_large_stdout_and_stderr_do_not_deadlock(transport: Transport) -> None:
    # 3 MiB on each stream exceeds SSH's 2 MiB window: both must be drained together.
    script = "import sys; sys.stdout.write('o'*(3<<20)); sys.stderr.write('e'*(3<<20))"
    result = transport.execute([sys.executable, "-c", script], timeout=60)
    assert (len(result.stdout), len(result.stderr)) == (3 << 20, 3 << 20)


def test_stdin_is_passed(transport: Transport) -> None:
    assert transport.run(["cat"], stdin=b"line one\nline two\n") == "line one\nline two\n"


def test_command_timeout_is_enforced(transport: Transport) -> None:
    start = time.monotonic()
    with pytest.raises(DeviceError, match=repr(transport.device.name)):
        transport.run(["sleep", "5"], timeout=1)
    assert time.monotonic() - start < 10
    assert transport.run(["echo", "still usable"]).strip() == "still usable"


def test_upload_if_changed_uploads_once_then_skips(transport: Transport, tmp_path: Path) -> None:
    local = tmp_path / "agent.py"
    local.write_bytes(b"print('v1')\n" * 1000)
    remote = f"{tmp_path}/remote dir/agent copy.py"
    first = transport.upload_if_changed(local, remote)
    assert first.uploaded and first.path == remote
    assert Path(remote).read_bytes() == local.read_bytes()
    second = transport.upload_if_changed(local, remote)
    assert not second.uploaded and second.sha256 == first.sha256
    local.write_bytes(b"print('v2')\n")
    third = transport.upload_if_changed(local, remote)
    assert third.uploaded and Path(remote).read_bytes() == b"print('v2')\n"
    # atomic: no temp file is left beside it
    assert sorted(p.name for p in Path(remote).parent.iterdir()) == ["agent copy.py"]


def test_upload_expands_home(transport: Transport, tmp_path: Path) -> None:
    local = tmp_path / "x.bin"
    local.write_bytes(b"\0\1\2")
    result = transport.upload_if_changed(local, "~/.deepfleet-test/x.bin")
    try:
        assert result.path == str(Path.home() / ".deepfleet-test/x.bin")
        assert Path(result.path).read_bytes() == b"\0\1\2"
    finally:
        Path(result.path).unlink()
        Path(result.path).parent.rmdir()


def test_persistent_process_answers_requests(transport: Transport) -> None:
    with transport.start([sys.executable, "-u", "-c", ECHO]) as proc:
        assert proc.pid > 0
        for i in range(20):
            assert proc.request({"op": "ping", "i": i}, timeout=10) == {"echo": {"op": "ping",
                                                                                 "i": i}}
        with pytest.raises(DeviceError, match=r"ended \(exit status 7\).*bye from echo"):
            proc.request({"op": "exit"}, timeout=10)


def test_hung_process_times_out_then_is_killed(transport: Transport) -> None:
    proc = transport.start([sys.executable, "-u", "-c", ECHO])
    assert proc.request({"op": "ping"}, timeout=10) == {"echo": {"op": "ping"}}
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"did not answer a 'hang' request within 1 s"):
        proc.request({"op": "hang"}, timeout=1)
    assert time.monotonic() - start < 5
    with pytest.raises(DeviceError, match="out of step"):
        proc.request({"op": "ping"}, timeout=1)
    assert proc.kill() is True
    # The process is gone on the device (once its parent has reaped it: a zombie still
    # answers kill -0, so poll briefly).
    gone = "for i in $(seq 50); do kill -0 \"$1\" 2>/dev/null || exit 0; sleep 0.1; done; exit 1"
    assert transport.execute(["sh", "-c", gone, "probe", str(proc.pid)]).exit_status == 0


def test_missing_program_fails_at_start_or_first_request(transport: Transport) -> None:
    # Locally the exec fails at once; over SSH the shell starts and then reports it.
    with pytest.raises(DeviceError, match=r"no-such-program-xyz.*(not found|No such file)"):
        proc = transport.start(["no-such-program-xyz", "--flag"])
        try:
            proc.request({"op": "hello"}, timeout=10)
        finally:
            proc.kill()
