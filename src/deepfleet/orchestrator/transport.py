"""How the orchestrator talks to a device: run a command, upload a file, keep a process running.

:class:`Transport` is the one plug-in point, with an SSH implementation
(:class:`deepfleet.orchestrator.ssh.SSHTransport`) and a local one (:class:`LocalTransport`, for
the built-in ``local`` device). Both take argv lists, never shell strings. :func:`open_transport`
picks the right one for a :class:`~deepfleet.orchestrator.fleet.Device`.

A :class:`RemoteProcess` is a long-lived process (the device agent) that speaks one JSON object
per line on stdin/stdout. Every request has a deadline; a process that missed one is out of step
(a late reply would answer the wrong request), so it refuses further requests until it is killed
and started again.
"""

from __future__ import annotations

import abc
import collections
import hashlib
import json
import os
import select
import selectors
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from deepfleet.errors import DeviceError
from deepfleet.orchestrator.fleet import Device

__all__ = [
    "CommandResult",
    "LocalProcess",
    "LocalTransport",
    "RemoteProcess",
    "Transport",
    "UploadResult",
    "open_transport",
]

# Runs on the device with its own Python (>= 3.8, stdlib only): expands "~", creates the parent
# directory, and prints ["<sha256 or ->", "<absolute path>"] as one JSON line. One round trip
# answers "where exactly is it" and "do I need to upload it".
_DIGEST_SCRIPT = (
    "import hashlib,json,os,sys\n"
    "p=os.path.abspath(os.path.expanduser(sys.argv[1]))\n"
    "os.makedirs(os.path.dirname(p),exist_ok=True)\n"
    "h=hashlib.sha256()\n"
    "try:\n"
    " with open(p,'rb') as f:\n"
    "  for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n"
    " d=h.hexdigest()\n"
    "except FileNotFoundError:\n"
    " d='-'\n"
    "print(json.dumps([d,p]))\n"
)

# Upper bound on one JSON reply line: protects the driver from a runaway process.
MAX_LINE_BYTES = 64 << 20
# How much of a process's stderr is kept for error messages.
_STDERR_TAIL_BYTES = 4096


@dataclass(frozen=True, kw_only=True)
class CommandResult:
    """Outcome of one finished command: exit status (-1: killed by a signal) and its output."""

    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str


@dataclass(frozen=True, kw_only=True)
class UploadResult:
    """Outcome of :meth:`Transport.upload_if_changed` (``path`` is absolute on the device)."""

    path: str
    sha256: str
    uploaded: bool


def file_sha256(path: Path) -> str:
    """The hex sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RemoteProcess(abc.ABC):
    """A running process that answers one JSON line on stdout for each JSON line on stdin.

    Subclasses move bytes (``_send``/``_recv``), report the exit status (``poll``) and kill the
    process with everything it started (``kill``). Not thread-safe: one request at a time.
    """

    def __init__(self, device: str, argv: tuple[str, ...], pid: int) -> None:
        self.device = device
        self.argv = argv
        self.pid = pid
        self._buffer = bytearray()
        self._stderr: collections.deque[bytes] = collections.deque()
        self._out_of_step: str | None = None

    @abc.abstractmethod
    def _send(self, data: bytes, deadline: float) -> None:
        """Write all of ``data`` to stdin before ``deadline`` (``time.monotonic``) or raise
        TimeoutError."""

    @abc.abstractmethod
    def _recv(self, deadline: float) -> bytes:
        """Return the next stdout bytes (``b""`` at end of file), raise TimeoutError at
        ``deadline``; stderr that arrives meanwhile goes to :meth:`_keep_stderr`."""

    @abc.abstractmethod
    def poll(self) -> int | None:
        """The exit status if the process has ended, else None."""

    @abc.abstractmethod
    def kill(self) -> bool:
        """Kill the process group and release the stream; True if the kill was delivered (or
        the process had already ended). Never raises: a dead link makes it return False."""

    def _keep_stderr(self, data: bytes) -> None:
        self._stderr.append(data)
        while sum(map(len, self._stderr)) > _STDERR_TAIL_BYTES and len(self._stderr) > 1:
            self._stderr.popleft()

    @property
    def stderr_tail(self) -> str:
        """The last few KiB the process wrote to stderr (for error messages)."""
        return b"".join(self._stderr)[-_STDERR_TAIL_BYTES:].decode("utf-8", "replace")

    def _fail(self, what: str) -> DeviceError:
        tail = self.stderr_tail.strip()
        return DeviceError(f"device {self.device!r}: process {self.argv[0]!r} (pid {self.pid}) "
                           f"{what}" + (f"; its stderr ends with: {tail[-500:]}" if tail else ""))

    def request(self, obj: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``obj`` as one JSON line and return the one JSON object that comes back.

        Raises :class:`DeviceError` if no complete reply arrives within ``timeout`` seconds (the
        process is then out of step: :meth:`kill` it and start a new one), if the process ends,
        or if the reply is not a JSON object.
        """
        if self._out_of_step:
            raise self._fail(f"is out of step after {self._out_of_step}; kill() it and start a "
                             "new one")
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        what = obj.get("op", obj.get("cmd", "request"))
        deadline = time.monotonic() + timeout
        try:
            self._send(line.encode(), deadline)
            reply = self._readline(deadline)
        except TimeoutError:
            self._out_of_step = f"a {what!r} request that got no reply within {timeout:g} s"
            raise self._fail(f"did not answer a {what!r} request within {timeout:g} s (hung "
                             "process or cut link)") from None
        except OSError as exc:
            self._out_of_step = f"a broken stream ({exc})"
            raise self._fail(f"stream broke during a {what!r} request: {exc}") from exc
        try:
            answer = json.loads(reply)
        except ValueError:
            self._out_of_step = "a reply that was not JSON"
            raise self._fail(f"answered {what!r} with a line that is not JSON: "
                             f"{reply[:200]!r}") from None
        if not isinstance(answer, dict):
            raise self._fail(f"answered {what!r} with JSON that is not an object: {reply[:200]!r}")
        return answer

    def _readline(self, deadline: float) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_LINE_BYTES:
                self._out_of_step = "an over-long reply"
                raise self._fail(f"sent a line longer than {MAX_LINE_BYTES} bytes")
            chunk = self._recv(deadline)
            if not chunk:
                # Give the exit status a moment to arrive after EOF so the message can show it.
                end_by = time.monotonic() + 1.0
                while self.poll() is None and time.monotonic() < end_by:
                    time.sleep(0.02)
                self._out_of_step = "its exit"
                raise self._fail(f"ended (exit status {self.poll()}) before answering")
            self._buffer += chunk

    def __enter__(self) -> RemoteProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class Transport(abc.ABC):
    """Runs argv lists and moves files on one device; a context manager that releases it.

    Subclasses implement :meth:`execute` (run to completion), :meth:`start` (a persistent
    :class:`RemoteProcess`) and :meth:`_put` (an atomic file write). Everything else is built on
    those three, so both transports behave the same.
    """

    def __init__(self, device: Device) -> None:
        self.device = device

    @abc.abstractmethod
    def execute(self, argv: list[str] | tuple[str, ...], *, timeout: float = 60.0,
                stdin: bytes | None = None) -> CommandResult:
        """Run ``argv`` to completion and return its result whatever the exit status; raise
        :class:`DeviceError` if the device cannot be reached or the command outlives
        ``timeout`` seconds. (Over SSH a timed-out command is not killed: its pipes close, so it
        ends when it next writes. Use :meth:`start` for anything that must be killable.)"""

    @abc.abstractmethod
    def start(self, argv: list[str] | tuple[str, ...], *, timeout: float = 30.0) -> RemoteProcess:
        """Start ``argv`` as a persistent process in its own process group."""

    @abc.abstractmethod
    def _put(self, local: Path, remote: str, timeout: float) -> None:
        """Write ``local`` to the absolute ``remote`` path atomically (temp name, then rename)."""

    def close(self) -> None:  # noqa: B027 - a no-op hook: the local transport holds nothing
        """Release connections (idempotent). The transport reconnects if used again."""

    def run(self, argv: list[str] | tuple[str, ...], *, timeout: float = 60.0,
            stdin: bytes | None = None) -> str:
        """Run ``argv`` and return its stdout; a non-zero exit raises :class:`DeviceError`
        naming the device, the command, the exit status and stderr."""
        result = self.execute(argv, timeout=timeout, stdin=stdin)
        if result.exit_status != 0:
            raise DeviceError(
                f"device {self.device.name!r}: command {list(result.argv)!r} exited with status "
                f"{result.exit_status}; stderr: {result.stderr.strip()[-1000:] or '(empty)'}"
            )
        return result.stdout

    def _digest(self, remote: str, timeout: float) -> tuple[str, str]:
        out = self.run([self.device.python, "-c", _DIGEST_SCRIPT, remote], timeout=timeout)
        try:
            digest, path = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise DeviceError(f"device {self.device.name!r}: unexpected answer from the "
                              f"sha256 check of {remote!r}: {out[-300:]!r}") from exc
        return str(digest), str(path)

    def expand(self, remote: str, *, timeout: float = 30.0) -> str:
        """The absolute path of ``remote`` on the device (``~`` expanded); creates its parent."""
        return self._digest(remote, timeout)[1]

    def upload_if_changed(self, local: str | Path, remote: str, *,
                          timeout: float = 120.0) -> UploadResult:
        """Make ``remote`` (``~`` allowed) a copy of ``local``, uploading only if the sha256 on
        the device differs. The write is atomic: readers never see a partial file."""
        local = Path(local)
        if not local.is_file():
            raise DeviceError(f"device {self.device.name!r}: cannot upload {local}: not a file")
        want = file_sha256(local)
        have, path = self._digest(remote, timeout)
        if have == want:
            return UploadResult(path=path, sha256=want, uploaded=False)
        self._put(local, path, timeout)
        return UploadResult(path=path, sha256=want, uploaded=True)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Local transport: subprocesses on this machine, same contract.


class LocalProcess(RemoteProcess):
    """A persistent subprocess in its own session (so a kill reaches all its children)."""

    def __init__(self, device: str, argv: tuple[str, ...], popen: subprocess.Popen[bytes]) -> None:
        super().__init__(device, argv, popen.pid)
        self._popen = popen
        self._selector = selectors.DefaultSelector()
        assert popen.stdout is not None and popen.stderr is not None  # set by LocalTransport
        self._selector.register(popen.stdout, selectors.EVENT_READ)
        self._selector.register(popen.stderr, selectors.EVENT_READ)
        assert popen.stdin is not None
        self._stdin_fd = popen.stdin.fileno()
        os.set_blocking(self._stdin_fd, False)

    def _send(self, data: bytes, deadline: float) -> None:
        # Non-blocking writes under the deadline: a child that stopped reading must not be able
        # to block the driver once the pipe buffer (64 KiB) is full.
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if select.select([], [self._stdin_fd], [], remaining)[1]:
                try:
                    view = view[os.write(self._stdin_fd, view):]
                except BlockingIOError:
                    continue

    def _recv(self, deadline: float) -> bytes:
        assert self._popen.stdout is not None and self._popen.stderr is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            for key, _ in self._selector.select(remaining):
                data = os.read(key.fd, 65536)
                if key.fileobj is self._popen.stderr:
                    if data:
                        self._keep_stderr(data)
                    else:
                        self._selector.unregister(self._popen.stderr)
                    continue
                if not data:
                    self._drain_stderr(min(deadline, time.monotonic() + 1.0))
                return data

    def _drain_stderr(self, deadline: float) -> None:
        # stdout and stderr are separate pipes: at stdout's EOF the last words on stderr (the
        # reason it exited) may still be unread.
        assert self._popen.stderr is not None
        fd = self._popen.stderr.fileno()
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], remaining)[0]:
                return
            data = os.read(fd, 65536)
            if not data:
                return
            self._keep_stderr(data)

    def poll(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> bool:
        if self._popen.poll() is None:
            try:
                os.killpg(self._popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._popen.wait(timeout=10)
        self._selector.close()
        for stream in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
            if stream is not None:
                stream.close()
        return True


class LocalTransport(Transport):
    """The built-in ``local`` device: subprocesses on this machine, no shell involved."""

    def execute(self, argv: list[str] | tuple[str, ...], *, timeout: float = 60.0,
                stdin: bytes | None = None) -> CommandResult:
        argv = tuple(argv)
        # Own session so that a timeout kills the command together with what it started.
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as proc:
            try:
                out, err = proc.communicate(stdin or b"", timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise DeviceError(f"device {self.device.name!r}: command {list(argv)!r} did not "
                                  f"finish within {timeout:g} s and was killed") from None
        return CommandResult(argv=argv, exit_status=proc.returncode,
                             stdout=out.decode("utf-8", "replace"),
                             stderr=err.decode("utf-8", "replace"))

    def start(self, argv: list[str] | tuple[str, ...], *, timeout: float = 30.0) -> RemoteProcess:
        try:
            popen = subprocess.Popen(tuple(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, bufsize=0)
        except OSError as exc:
            raise DeviceError(f"device {self.device.name!r}: cannot start {list(argv)!r}: "
                              f"{exc}") from exc
        return LocalProcess(self.device.name, tuple(argv), popen)

    def _put(self, local: Path, remote: str, timeout: float) -> None:
        target = Path(remote)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, open(local, "rb") as src:
                while block := src.read(1 << 20):
                    out.write(block)
            os.chmod(tmp, local.stat().st_mode & 0o777)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def open_transport(device: Device, **options: Any) -> Transport:
    """The transport for ``device``: local for the built-in device, else SSH.

    ``options`` go to :class:`~deepfleet.orchestrator.ssh.SSHTransport` (e.g. ``timeouts``).
    Nothing connects until the first use.
    """
    if device.is_local:
        return LocalTransport(device)
    from deepfleet.orchestrator.ssh import SSHTransport

    return SSHTransport(device, **options)
