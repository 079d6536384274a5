"""SSH transport: one lazily connected, verified Paramiko session per device.

Host keys are always verified, against the device's ``known_hosts`` file or its ``host_key``
fingerprint; an unknown or different key is refused with a :class:`DeviceError` that says how to
trust it. Every blocking step has a deadline: Paramiko's own defaults are not enough, because a
cut link leaves ``transport.is_active()`` True, ``channel_timeout`` defaults to an hour, and
``Channel.exec_command`` waits for the server's reply without any timeout at all. A watchdog
therefore closes the connection when a call passes its deadline; the next call reconnects
(with backoff while the device refuses connections, e.g. during a reboot).

A timed-out call cannot tell a cut link from a hung command, so it always closes the connection.
Persistent processes (:meth:`SSHTransport.start`) get a connection of their own so that a failed
``run`` never takes the device agent down with it.
"""

from __future__ import annotations

import logging
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paramiko

from deepfleet.errors import ConfigError, DeviceError
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.transport import CommandResult, RemoteProcess, Transport

__all__ = ["SSHProcess", "SSHTransport", "Timeouts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Timeouts:
    """Seconds allowed for each phase of a connection (each also capped by the call's deadline).

    ``reconnect_delays`` are the pauses between connection attempts while the device refuses or
    resets connections; a timed-out attempt is not retried (it has already waited).
    """

    connect: float = 10.0
    banner: float = 10.0
    auth: float = 10.0
    channel_open: float = 10.0
    kill: float = 10.0
    reconnect_delays: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)


class _Retry(Exception):
    """A connection attempt failed in a way that may pass (refused, reset): try again."""


class _Watchdog:
    """Calls ``abort`` if the ``with`` block is still running at ``deadline``."""

    def __init__(self, deadline: float, abort: Callable[[], None]) -> None:
        self.fired = False

        def fire() -> None:
            self.fired = True
            abort()

        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._timer.cancel()


def _keyscan_type(key: paramiko.PKey) -> str:
    name = key.get_name()
    return "ecdsa" if name.startswith("ecdsa") else name.removeprefix("ssh-")


class _VerifyHostKey(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]  # untyped base
    """Called by Paramiko for a host key that is not in the loaded known_hosts: accept it only
    if it matches the configured fingerprint; otherwise refuse, saying how to trust it."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        d = self.device
        got = f"{key.get_name()} {key.fingerprint}"
        if d.host_key is not None:
            if key.fingerprint == d.host_key:
                return
            raise DeviceError(
                f"device {d.name!r}: host key of {hostname} is {got}, but fleet.yaml says "
                f"host_key: {d.host_key}. Refusing to connect. If the device was re-installed, "
                f"check the key on the device (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and "
                f"then set `host_key: {key.fingerprint}` for {d.name!r} in fleet.yaml"
            )
        port = f"-p {d.port} " if d.port != 22 else ""
        raise DeviceError(
            f"device {d.name!r}: host key of {hostname} ({got}) is not in known_hosts "
            f"{d.known_hosts}. Refusing to connect. If this is the right device, trust it with: "
            f"ssh-keyscan {port}-t {_keyscan_type(key)} {d.host} >> {d.known_hosts}  "
            f"(and compare the fingerprint with ssh-keygen -lf on the device), or set "
            f"`host_key: {key.fingerprint}` in fleet.yaml"
        )


class SSHTransport(Transport):
    """The SSH session of one device; connects on first use, reconnects after failures."""

    def __init__(self, device: Device, *, timeouts: Timeouts | None = None) -> None:
        if device.is_local or device.key is None:
            raise ConfigError(f"device {device.name!r} has no host or key; use LocalTransport")
        super().__init__(device)
        self.timeouts = timeouts or Timeouts()
        self._lock = threading.Lock()
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._pkey: paramiko.PKey | None = None

    # -- connecting ------------------------------------------------------------------------

    def _where(self) -> str:
        d = self.device
        return f"device {d.name!r} ({d.user}@{d.host}:{d.port})"

    def _load_key(self) -> paramiko.PKey:
        if self._pkey is None:
            try:
                self._pkey = paramiko.PKey.from_path(str(self.device.key))
            except paramiko.PasswordRequiredException as exc:
                raise ConfigError(f"device {self.device.name!r}: key {self.device.key} is "
                                  "encrypted; give deepfleet an unencrypted key") from exc
            except (OSError, paramiko.SSHException, ValueError) as exc:
                raise ConfigError(f"device {self.device.name!r}: cannot load key "
                                  f"{self.device.key}: {exc}") from exc
        return self._pkey

    def _connect_once(self, deadline: float) -> paramiko.SSHClient:
        d, t = self.device, self.timeouts

        def cap(limit: float) -> float:
            return max(0.05, min(limit, deadline - time.monotonic()))

        client = paramiko.SSHClient()
        if d.known_hosts is not None:
            client.load_host_keys(str(d.known_hosts))
        client.set_missing_host_key_policy(_VerifyHostKey(d))
        budget = cap(t.connect)
        try:
            client.connect(
                d.host or "", port=d.port, username=d.user, pkey=self._load_key(),
                timeout=budget, banner_timeout=cap(t.banner), auth_timeout=cap(t.auth),
                channel_timeout=t.channel_open, allow_agent=False, look_for_keys=False,
            )
            return client
        except Exception as exc:
            client.close()
            raise self._connect_error(exc, budget) from exc
        except BaseException:
            client.close()
            raise

    def _connect_error(self, exc: BaseException, budget: float) -> Exception:
        where = self._where()
        if isinstance(exc, DeviceError | ConfigError):
            return exc
        if isinstance(exc, paramiko.BadHostKeyException):
            known = self.device.known_hosts
            return DeviceError(
                f"{where}: host key MISMATCH: the device offered {exc.key.get_name()} "
                f"{exc.key.fingerprint} but {known} has {exc.expected_key.fingerprint}. Refusing "
                "to connect (a re-installed device, or someone in the middle). If the device was "
                f"re-installed: ssh-keygen -R '[{self.device.host}]:{self.device.port}' -f "
                f"{known}, then add the new key with ssh-keyscan after checking it on the device"
            )
        if isinstance(exc, paramiko.AuthenticationException):
            return DeviceError(
                f"{where}: authentication refused for user {self.device.user!r} with key "
                f"{self.device.key} ({exc}). Check `user` and `key` in fleet.yaml and that the "
                "public key is in that user's ~/.ssh/authorized_keys on the device"
            )
        errors = list(exc.errors.values()) if isinstance(
            exc, paramiko.ssh_exception.NoValidConnectionsError) else [exc]
        if all(isinstance(e, ConnectionRefusedError) for e in errors):
            return _Retry(f"{where}: connection refused (no sshd listening there)")
        if any(isinstance(e, TimeoutError | socket.timeout) for e in errors):
            return DeviceError(f"{where}: no answer within {budget:.3g} s while connecting "
                               "(device off, link cut or traffic dropped)")
        if isinstance(exc, socket.gaierror):
            return DeviceError(f"{where}: cannot resolve host name {self.device.host!r}: {exc}")
        if isinstance(exc, ConnectionResetError | EOFError | paramiko.SSHException):
            return _Retry(f"{where}: connection dropped during the handshake ({exc!r})")
        causes = "; ".join(getattr(e, "strerror", None) or repr(e) for e in errors)
        return DeviceError(f"{where}: cannot connect: {causes}")

    def _new_client(self, deadline: float) -> paramiko.SSHClient:
        delays = iter(self.timeouts.reconnect_delays)
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._connect_once(deadline)
            except _Retry as exc:
                delay = next(delays, None)
                if delay is None or time.monotonic() + delay >= deadline:
                    raise DeviceError(f"{exc} (after {attempts} attempt"
                                      f"{'s' if attempts > 1 else ''})") from None
                log.info("%s; retrying in %.2g s", exc, delay)
                time.sleep(delay)

    def _connected(self, deadline: float) -> paramiko.SSHClient:
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if transport is None or not transport.is_active():
                if client is not None:
                    client.close()
                self._client = client = self._new_client(deadline)
                self._sftp = None
            return client

    def _drop(self, client: paramiko.SSHClient) -> None:
        with self._lock:
            if self._client is client:
                self._client, self._sftp = None, None
        client.close()

    def close(self) -> None:
        """Close this transport's connection; processes from :meth:`start` have their own and
        live until killed."""
        with self._lock:
            client, self._client, self._sftp = self._client, None, None
        if client is not None:
            client.close()

    def _lost(self, exc: BaseException, dog: _Watchdog, what: str, timeout: float) -> DeviceError:
        if dog.fired or isinstance(exc, TimeoutError | socket.timeout) or "Timeout" in str(exc):
            return DeviceError(
                f"{self._where()}: no answer within {timeout:g} s while {what} (link cut, device "
                "hung, or the command ran too long); the connection was closed and the next "
                "call reconnects"
            )
        return DeviceError(f"{self._where()}: connection lost while {what}: {exc!r}")

    # -- commands ----------------------------------------------------------------------------

    def execute(self, argv: list[str] | tuple[str, ...], *, timeout: float = 60.0,
                stdin: bytes | None = None) -> CommandResult:
        argv = tuple(argv)
        deadline = time.monotonic() + timeout
        client = self._connected(deadline)
        what = f"running {list(argv)!r}"
        with _Watchdog(deadline, client.close) as dog:
            try:
                chan = _open_channel(client, deadline, self.timeouts.channel_open)
                chan.settimeout(max(0.05, deadline - time.monotonic()))
                chan.exec_command(shlex.join(argv))
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()
                out, err, status = _collect(chan, deadline)
                chan.close()
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self._drop(client)
                raise self._lost(exc, dog, what, timeout) from exc
        return CommandResult(argv=argv, exit_status=status,
                             stdout=out.decode("utf-8", "replace"),
                             stderr=err.decode("utf-8", "replace"))

    def _put(self, local: Path, remote: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self._connected(deadline)
        tmp = f"{remote}.{time.time_ns():x}.tmp"
        with _Watchdog(deadline, client.close) as dog:
            try:
                with self._lock:
                    if self._sftp is None or self._client is not client:
                        self._sftp = client.open_sftp()
                    sftp = self._sftp
                sftp.get_channel().settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    sftp.put(str(local), tmp, confirm=True)
                    sftp.chmod(tmp, local.stat().st_mode & 0o777)
                    sftp.posix_rename(tmp, remote)  # atomic replace (OpenSSH extension)
                except OSError as exc:
                    if not isinstance(exc, TimeoutError | socket.timeout) and not dog.fired:
                        _remove_quietly(sftp, tmp)
                        raise DeviceError(f"{self._where()}: cannot write {remote}: {exc}") from exc
                    raise
            except (OSError, EOFError, paramiko.SSHException) as exc:
                self._drop(client)
                raise self._lost(exc, dog, f"uploading {local} to {remote}", timeout) from exc

    def start(self, argv: list[str] | tuple[str, ...], *, timeout: float = 30.0) -> SSHProcess:
        """Start ``argv`` over one exec channel on a connection of its own.

        The remote shell prints its pid (after a marker) and then ``exec``s the command, so the
        pid is that of the process and of its process group (sshd makes each session a new session): :meth:`kill`
        kills the whole group over a second channel.
        """
        argv = tuple(argv)
        deadline = time.monotonic() + timeout
        client = self._new_client(deadline)
        what = f"starting {list(argv)!r}"
        with _Watchdog(deadline, client.close) as dog:
            try:
                chan = _open_channel(client, deadline, self.timeouts.channel_open)
                chan.exec_command(f"echo {_PID_MARK}$$; exec " + shlex.join(argv))
                proc = SSHProcess(self, argv, client, chan)
                line = proc._readline(deadline)
                while not line.startswith(_PID_MARK.encode()):
                    line = proc._readline(deadline)  # skip what a chatty ~/.bashrc printed
                proc.pid = int(line[len(_PID_MARK):])
            except (OSError, EOFError, paramiko.SSHException) as exc:
                client.close()
                raise self._lost(exc, dog, what, timeout) from exc
            except (DeviceError, ValueError) as exc:
                client.close()
                raise DeviceError(f"{self._where()}: could not start {list(argv)!r}: "
                                  f"{exc}") from exc
        return proc


# Precedes the remote shell's pid on the first line a persistent process's channel carries.
_PID_MARK = "deepfleet-pid:"


def _open_channel(client: paramiko.SSHClient, deadline: float, limit: float) -> paramiko.Channel:
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise paramiko.SSHException("connection closed")
    return transport.open_session(timeout=max(0.05, min(limit, deadline - time.monotonic())))


def _collect(chan: paramiko.Channel, deadline: float) -> tuple[bytes, bytes, int]:
    """Read stdout and stderr together (neither can fill the window and stall the other) until
    both end-of-file and the exit status have arrived. Both are needed: OpenSSH may send the
    exit status while stderr data is still on its way; EOF comes after the last byte."""
    out, err = bytearray(), bytearray()
    while True:
        while chan.recv_ready():
            out += chan.recv(65536)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        finished = chan.closed or (chan.eof_received and chan.exit_status_ready())
        if finished and not chan.recv_ready() and not chan.recv_stderr_ready():
            status = chan.recv_exit_status()
            transport = chan.get_transport()
            if status == -1 and (transport is None or not transport.is_active()):
                # Paramiko's -1 means "closed without a status": here, by a dying connection.
                raise EOFError("the connection closed before the command finished")
            return bytes(out), bytes(err), status  # -1 with a live link: killed by a signal
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        # fileno() is a pipe Paramiko signals for stdout, stderr and close; the cap re-checks
        # exit_status_ready, whose arrival alone does not signal the pipe.
        select.select([chan.fileno()], [], [], min(remaining, 0.2))


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except OSError:
        pass  # the temp file may never have been created; nothing to clean up then


class SSHProcess(RemoteProcess):
    """A persistent remote process on its own SSH connection and exec channel."""

    def __init__(self, owner: SSHTransport, argv: tuple[str, ...], client: paramiko.SSHClient,
                 chan: paramiko.Channel) -> None:
        super().__init__(owner.device.name, argv, pid=0)
        self._owner = owner
        self._client = client
        self._chan = chan

    def _send(self, data: bytes, deadline: float) -> None:
        self._chan.settimeout(max(0.01, deadline - time.monotonic()))
        self._chan.sendall(data)

    def _recv(self, deadline: float) -> bytes:
        chan = self._chan
        while True:
            while chan.recv_stderr_ready():
                self._keep_stderr(chan.recv_stderr(65536))
            if chan.recv_ready():
                return bytes(chan.recv(65536))
            if chan.eof_received or chan.closed:
                # Paramiko's reader thread may have queued the last output and the EOF after
                # the checks above: the channel's data precedes its EOF, so read what is
                # buffered now (on a loaded machine the exit reason on stderr was lost).
                while chan.recv_stderr_ready():
                    self._keep_stderr(chan.recv_stderr(65536))
                return bytes(chan.recv(65536)) if chan.recv_ready() else b""
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            select.select([chan.fileno()], [], [], min(remaining, 0.2))

    def poll(self) -> int | None:
        chan = self._chan
        return chan.recv_exit_status() if chan.exit_status_ready() else None

    def kill(self) -> bool:
        """Kill the process group over a second channel (the first may be stuck behind a hung
        process), then close this process's connection. False if the kill could not be
        delivered (the device is unreachable); the connection is closed anyway."""
        delivered = self.poll() is not None
        if not delivered and self.pid > 0:
            try:
                # The group first (the process and anything it started); the pid alone if it is
                # not a group leader; "gone already" also counts as delivered.
                result = self._owner.execute(
                    ["sh", "-c", 'kill -KILL -- "-$1" 2>/dev/null || kill -KILL "$1" 2>/dev/null'
                     ' || ! kill -0 "$1" 2>/dev/null', "kill", str(self.pid)],
                    timeout=self._owner.timeouts.kill)
                delivered = result.exit_status == 0
            except DeviceError as exc:
                log.warning("could not kill pid %s on %s: %s", self.pid, self.device, exc)
        self._client.close()
        return delivered
