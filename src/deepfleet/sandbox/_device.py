"""Start, stop and tear down one sandbox device, recording every step in its state record.

A record is a plain dict kept in ``state.json``; ``commit()`` saves it after each step that
creates something, so a failure half-way leaves enough behind for :func:`teardown`.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deepfleet.device_agent import powersim
from deepfleet.errors import DeviceError
from deepfleet.sandbox import _cgroup, _netns
from deepfleet.sandbox._kinds import Kind
from deepfleet.sandbox._proc import kill_pids, kill_tree, sh, wait_for_file
from deepfleet.sandbox._roots import mount_root
from deepfleet.sandbox._sshd import (
    LoopbackSshd,
    Sshd,
    keygen,
    sshd_binary,
    sshd_config,
)

__all__ = ["start_loopback", "start_netns", "start_sshd", "stop_processes", "teardown"]

Record = dict[str, Any]

# Processes that must outlive this call (sshd, power simulator) but that we started: holding
# their Popen objects avoids "still running" warnings when they would be garbage-collected.
_DAEMONS: list[subprocess.Popen[bytes]] = []
# The one power simulator (also used by the agent's tests), run on this machine in its cgroup
# counter mode: the device's own CPU time drives its simulated power.
_POWERSIM = Path(powersim.__file__)
_SIM_DIR = "var/lib/deepfleet/sim-hwmon"  # inside a root; the device sees /var/lib/...


def _sshd_of(rec: Record) -> Sshd:
    s = rec["sshd"]
    return Sshd(name=rec["name"], argv=s["argv"], pid_file=Path(s["pid_file"]),
                log_file=Path(s["log_file"]), join=tuple(s["join"]))


def start_sshd(rec: Record, commit: Callable[[], None]) -> None:
    """(Re)start the device's sshd as recorded; qemu-emulated sshd gets more time to start."""
    sshd = _sshd_of(rec)
    pid = sshd.start(timeout=90.0 if rec.get("emulated") else 20.0)
    assert sshd.popen is not None
    _DAEMONS.append(sshd.popen)
    rec["sshd"]["pid"] = pid
    commit()


def start_netns(rec: Record, kind: Kind, *, state_dir: Path, client_public: str,
                tarball: Path | None, python: str | None, commit: Callable[[], None]) -> None:
    """Start a device in its own network namespace (and chroot, for a foreign root, whose
    interpreter is its ``python3``; ``python`` is the interpreter of the others)."""
    dev_dir = Path(rec["dir"])
    dev_dir.mkdir(parents=True, exist_ok=True)
    ns = _netns.create()
    rec.update(mode="netns", netns=asdict(ns), host=ns.device_ip, port=22, user="root")
    commit()
    group = None
    if kind.cpus is not None or kind.power is not None:
        group = _cgroup.create(ns.name, cpus=kind.cpus)
        rec["cgroup"] = asdict(group)
        commit()
    prefix = ["ip", "netns", "exec", ns.name]
    if kind.personality:
        prefix += ["setarch", kind.personality]
    if kind.arch is not None:
        assert tarball is not None
        root = dev_dir / "root"
        rec.update(root=str(root), emulated=kind.arch != "i386")
        commit()
        rec["mounts"] = mount_root(tarball, root, dev_dir / "overlay")
        commit()
        sh(["mount", "-t", "proc", "proc", str(root / "proc")])
        rec["mounts"].append(str(root / "proc"))
        commit()
        seen, view = root, "/"  # sshd sees paths inside the root
        argv_tail = ["chroot", str(root), "/usr/sbin/sshd"]
        rec.update(python="python3", workdir="~/.deepfleet")
    else:
        seen, view = dev_dir, str(dev_dir) + "/"
        binary = sshd_binary()
        if binary is None:
            raise DeviceError("sandbox: sshd not found (install openssh-server)")
        argv_tail = [binary]
        # This machine's sshd separates privileges in /run/sshd, which nothing creates at boot
        # on machines without systemd.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        assert python is not None
        rec.update(python=python, workdir=str(dev_dir / "work"))
    files = {"key": "etc/ssh/ssh_host_ed25519_key", "auth": "etc/ssh/deepfleet_authorized_keys",
             "config": "etc/ssh/deepfleet_sshd_config", "pid": "run/deepfleet-sshd.pid"}
    for rel in ("etc/ssh", "run/sshd"):
        (seen / rel).mkdir(parents=True, exist_ok=True)
    rec["host_public"] = keygen(seen / files["key"], f"deepfleet-{rec['name']}")
    (seen / files["auth"]).write_text(client_public + "\n")
    (seen / files["config"]).write_text(sshd_config(
        listen=ns.device_ip, port=22, host_key=view + files["key"],
        authorized_keys=view + files["auth"], pid_file=view + files["pid"], user="root"))
    rec["sshd"] = {
        "argv": [*prefix, *argv_tail, "-D", "-e", "-f", view + files["config"]],
        "pid_file": str(seen / files["pid"]), "log_file": str(dev_dir / "sshd.log"),
        "join": list(group.procs) if group else [], "pid": None,
    }
    commit()
    start_sshd(rec, commit)
    if kind.link is not None:
        _netns.shape(ns, rate_kbit=kind.link.rate_kbit, loss_percent=kind.link.loss_percent)
    if kind.power is not None:
        assert group is not None
        _start_power(rec, kind, group, seen / _SIM_DIR, "/" + _SIM_DIR if kind.arch else None,
                     commit)


def _start_power(rec: Record, kind: Kind, group: _cgroup.Cgroup, out: Path,
                 device_view: str | None, commit: Callable[[], None]) -> None:
    assert kind.power is not None
    power = kind.power
    log = Path(rec["dir"]) / "powersim.log"
    with open(log, "ab") as f:
        popen = subprocess.Popen(
            [sys.executable, str(_POWERSIM), "--usage", group.usage_file, "--out", str(out),
             "--cpus", str(group.cpus or 1.0), "--idle-w", str(power.idle_w),
             "--active-w", str(power.active_w), "--hz", str(power.sample_hz),
             "--window-s", str(power.window_s)],
            stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
    _DAEMONS.append(popen)
    rec.update(power_pid=popen.pid, power_dir=str(out / "hwmon0"))
    commit()
    wait_for_file(out / "hwmon0" / "power1_input", timeout=15, alive=popen,
                  what="the power simulator")
    # The fleet file says the sensor is simulated, so every row measured with it says so even
    # if the agent did not recognise the simulator's own marks.
    rec["energy"] = {"source": "hwmon", "path": (device_view or str(out)) + "/hwmon0",
                     "sample_hz": power.sample_hz, "simulated": power.note}
    commit()


def start_loopback(rec: Record, *, state_dir: Path, client_key: Path, python: str,
                   commit: Callable[[], None]) -> None:
    """Start a device as an sshd on 127.0.0.1 run by this user (no namespaces needed), whose
    interpreter is ``python``."""
    dev_dir = Path(rec["dir"])
    server = LoopbackSshd(dev_dir, name=rec["name"], client_key=client_key)
    rec.update(mode="loopback", host="127.0.0.1", port=server.port, user=getpass.getuser(),
               python=python, workdir=str(dev_dir / "work"),
               host_public=server.host_public)
    rec["sshd"] = {"argv": server.sshd.argv, "pid_file": str(server.sshd.pid_file),
                   "log_file": str(server.sshd.log_file), "join": [], "pid": None}
    commit()
    start_sshd(rec, commit)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def stop_processes(rec: Record) -> None:
    """Kill every process of the device except its power simulator (a device losing power)."""
    if rec.get("netns"):
        kill_pids(_netns.ns_pids(_netns.Netns(**rec["netns"])))
    pid = (rec.get("sshd") or {}).get("pid")
    # Check the command line before killing a recorded pid: after a reboot it may be reused.
    if pid and "sshd" in _cmdline(pid):
        kill_tree(pid)
    if rec.get("cgroup"):
        for procs in _cgroup.Cgroup(**rec["cgroup"]).procs:
            if Path(procs).exists():
                kill_pids(int(p) for p in Path(procs).read_text().split())


def teardown(rec: Record) -> None:
    """Undo everything the record says was created. Idempotent; raises DeviceError if a mount
    cannot be removed (the device directory is then left in place, never deleted under it)."""
    pid = rec.get("power_pid")
    if pid and _POWERSIM.name in _cmdline(pid):
        kill_pids([pid])
    stop_processes(rec)
    if rec.get("netns"):
        _netns.delete(_netns.Netns(**rec["netns"]))
    if rec.get("cgroup"):
        group = rec["cgroup"]
        _cgroup.remove(_cgroup.Cgroup(dirs=tuple(group["dirs"]), usage_file=group["usage_file"],
                                      cpus=group["cpus"]))
    for mount in reversed(rec.get("mounts", [])):
        if _mounted_under(mount):
            if sh(["umount", mount], check=False).returncode != 0:
                sh(["umount", "-l", mount], check=False)
    dev_dir = Path(rec["dir"])
    busy = _mounted_under(str(dev_dir))
    if busy:
        raise DeviceError(f"sandbox: {busy[0]} is still mounted; not deleting {dev_dir} "
                          f"(unmount it by hand, then run down again)")
    shutil.rmtree(dev_dir, ignore_errors=True)


def _mounted_under(path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [p for p in points if p == path or p.startswith(prefix)]
