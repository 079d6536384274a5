"""CPU quota and CPU-time accounting for a sandbox device, with cgroup v1.

FLEET-NOTES: on these machines cgroup **v1** ``cpu.cfs_quota_us`` works (25 % -> 3.7x slower)
while v2 ``cpu.max`` does not, so v1 is used when its ``cpu`` hierarchy is mounted; v2 is tried
only on machines that have nothing else. The device's sshd listener joins the group before it
execs, and every session it forks inherits the group, so the quota and the CPU-time counter
cover all the device's work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deepfleet.errors import DeviceError

__all__ = ["Cgroup", "create", "remove", "why_unavailable"]

_ROOT = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


@dataclass(frozen=True, kw_only=True)
class Cgroup:
    """The directories of one device's groups; ``procs`` are the files a pid is written to."""

    dirs: tuple[str, ...]
    usage_file: str  # nanoseconds (v1 cpuacct.usage) or "usage_usec" line (v2 cpu.stat)
    cpus: float | None

    @property
    def procs(self) -> tuple[str, ...]:
        return tuple(f"{d}/cgroup.procs" for d in self.dirs)


def _v1_mount(controller: str) -> Path | None:
    """The mount point of the v1 hierarchy that has ``controller`` (it may be co-mounted)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and controller in fields[3].split(","):
            return Path(fields[1])
    return None


def why_unavailable() -> str | None:
    """None if a CPU quota can be set here, else the reason."""
    if os.geteuid() != 0:
        return "not root (cgroups need root)"
    if _v1_mount("cpu") and _v1_mount("cpuacct"):
        return None
    if (_ROOT / "cgroup.controllers").exists() and \
            "cpu" in (_ROOT / "cgroup.controllers").read_text().split():
        return None
    return "no cgroup v1 cpu/cpuacct hierarchy and no cgroup v2 cpu controller"


def create(name: str, *, cpus: float | None) -> Cgroup:
    """Create the groups of device ``name``; with ``cpus`` cap it at that many CPUs."""
    cpu_mount, acct_mount = _v1_mount("cpu"), _v1_mount("cpuacct")
    if cpu_mount and acct_mount:
        cpu_dir = cpu_mount / "deepfleet" / name
        acct_dir = acct_mount / "deepfleet" / name
        for d in {cpu_dir, acct_dir}:
            d.mkdir(parents=True, exist_ok=True)
        if cpus is not None:
            (cpu_dir / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (cpu_dir / "cpu.cfs_quota_us").write_text(str(round(cpus * _PERIOD_US)))
        dirs = tuple(dict.fromkeys(str(d) for d in (cpu_dir, acct_dir)))
        return Cgroup(dirs=dirs, usage_file=str(acct_dir / "cpuacct.usage"), cpus=cpus)
    # cgroup v2: the cpu controller must be enabled for children of the parent group.
    parent = _ROOT / "deepfleet"
    parent.mkdir(exist_ok=True)
    (_ROOT / "cgroup.subtree_control").write_text("+cpu")
    (parent / "cgroup.subtree_control").write_text("+cpu")
    group = parent / name
    group.mkdir(exist_ok=True)
    if cpus is not None:
        (group / "cpu.max").write_text(f"{round(cpus * _PERIOD_US)} {_PERIOD_US}")
    return Cgroup(dirs=(str(group),), usage_file=str(group / "cpu.stat"), cpus=cpus)


def remove(group: Cgroup) -> None:
    """Remove the groups (their processes must be gone already). Idempotent."""
    for d in group.dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DeviceError(f"sandbox: cannot remove cgroup {d}: {exc.strerror} (processes "
                              f"left in {d}/cgroup.procs?)") from exc
        try:
            os.rmdir(os.path.dirname(d))  # the shared "deepfleet" parent, once empty
        except OSError:
            pass  # it still holds another sandbox's group
