"""Real sshd servers for sandbox devices and tests: keys, config, start, kill.

Facts this relies on (see FLEET-NOTES): sshd needs an absolute ``-f`` path and binary path (it
re-executes itself per connection), ``/run/sshd`` for privilege separation, and ``StrictModes no``
when ``authorized_keys`` lives in a world-traversable test directory. known_hosts entries for a
port other than 22 are written as ``[host]:port``.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from deepfleet.errors import DeviceError
from deepfleet.sandbox._proc import kill_tree, sh, wait_for_file

__all__ = [
    "LoopbackSshd",
    "Sshd",
    "free_port",
    "keygen",
    "known_hosts_entry",
    "sshd_binary",
    "sshd_config",
]


def sshd_binary() -> str | None:
    """The absolute path of this machine's sshd, or None if openssh-server is not installed."""
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK)
                                     else None)
    return str(Path(found).resolve()) if found else None


def _sshd_version(binary: str) -> tuple[int, int]:
    # `sshd -V` prints e.g. "OpenSSH_9.2p1 Debian-2, OpenSSL ..." on stderr (older: usage error).
    out = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def keygen(path: Path, comment: str) -> str:
    """Create an ed25519 key pair at ``path`` (+ ``.pub``) unless it exists; return the public
    key line."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return Path(f"{path}.pub").read_text().strip()


def known_hosts_entry(host: str, port: int, public_line: str) -> str:
    """One known_hosts line for ``host:port`` (the bracket form OpenSSH uses off port 22)."""
    name = host if port == 22 else f"[{host}]:{port}"
    key_type, key_b64 = public_line.split()[:2]
    return f"{name} {key_type} {key_b64}"


def sshd_config(*, listen: str, port: int, host_key: str, authorized_keys: str, pid_file: str,
                user: str, penalties_option: bool = False) -> str:
    """An sshd_config that allows exactly ``user`` with a public key and nothing else.

    Paths are as the sshd process sees them (inside its chroot, if any).
    """
    lines = [
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {user}",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        # The key files live in a sandbox directory that sshd's ownership rules would reject.
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        # In-process SFTP works the same inside foreign roots (no sftp-server path to get right).
        "Subsystem sftp internal-sftp",
        # Tests open many connections quickly; the defaults (10:30:100) would drop some.
        "MaxStartups 200:30:400",
        "MaxSessions 64",
        "LogLevel INFO",
    ]
    if penalties_option:
        # OpenSSH >= 9.8 penalises sources with failed logins; the wrong-key tests would then be
        # locked out of 127.0.0.1 for a while.
        lines.append("PerSourcePenalties no")
    return "\n".join(lines) + "\n"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (sshd binds it with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(kw_only=True)
class Sshd:
    """One sshd listener started from ``argv`` (which may enter a namespace and a chroot).

    ``pid_file`` is the host path of the file sshd writes once it listens; ``join`` lists
    ``cgroup.procs`` files the process enters before it execs, so that every session it forks
    is in those groups from the start.
    """

    name: str
    argv: list[str]
    pid_file: Path
    log_file: Path
    join: tuple[str, ...] = ()
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, *, timeout: float = 30.0) -> int:
        """Start sshd and wait until it listens; return the listener's pid."""
        self.pid_file.unlink(missing_ok=True)
        join = self.join

        def enter_groups() -> None:
            for procs in join:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        with open(self.log_file, "ab") as log:
            # Own session: survives the CLI that started it and can be killed as one tree.
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log, start_new_session=True,
                                          preexec_fn=enter_groups if join else None)
        try:
            wait_for_file(self.pid_file, timeout=timeout, alive=self.popen,
                          what=f"sshd of {self.name}")
        except DeviceError as exc:
            tail = self.log_file.read_text(errors="replace")[-600:]
            self.kill()
            raise DeviceError(f"{exc}; its log ends with: {tail}") from None
        return self.popen.pid

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def kill(self) -> None:
        """Kill the listener and every session it started (like a device losing power)."""
        if self.popen is not None:
            kill_tree(self.popen.pid)
            self.popen.wait(timeout=10)
            self.popen = None


class LoopbackSshd:
    """An sshd on 127.0.0.1 run by this user: the fallback device, and the tests' server.

    Its directory holds its host key, authorized_keys (the public half of ``client_key``),
    config, pid file and log. :meth:`kill` and :meth:`start` simulate a device going away and
    coming back on the same port with the same host key.
    """

    def __init__(self, directory: Path, *, name: str, client_key: Path,
                 port: int | None = None) -> None:
        binary = sshd_binary()
        if binary is None:
            raise DeviceError("sandbox: sshd not found; install openssh-server "
                              "(scripts/system-deps.sh does it as root)")
        self.name = name
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_public = keygen(self.dir / "ssh_host_ed25519_key", f"deepfleet-{name}")
        client_public = keygen(client_key, "deepfleet-sandbox-user")
        (self.dir / "authorized_keys").write_text(client_public + "\n")
        if os.geteuid() == 0:
            # Privilege separation directory; not created at boot on machines without systemd.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = self.dir / "sshd_config"
        config.write_text(sshd_config(
            listen="127.0.0.1", port=self.port, host_key=str(self.dir / "ssh_host_ed25519_key"),
            authorized_keys=str(self.dir / "authorized_keys"),
            pid_file=str(self.dir / "sshd.pid"), user=self.user,
            penalties_option=_sshd_version(binary) >= (9, 8),
        ))
        self.sshd = Sshd(name=name, argv=[binary, "-D", "-e", "-f", str(config)],
                         pid_file=self.dir / "sshd.pid", log_file=self.dir / "sshd.log")

    @property
    def known_hosts_line(self) -> str:
        return known_hosts_entry("127.0.0.1", self.port, self.host_public)

    @property
    def host_key_path(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    def start(self) -> int:
        return self.sshd.start()

    def kill(self) -> None:
        self.sshd.kill()
