"""``up`` and ``down``: start a fleet of real sshd devices on this machine, and remove it.

``up`` starts what this machine allows and says what it skipped and why: as root with network
namespaces every kind can run; without root (or without namespaces) x86 devices fall back to
sshd on 127.0.0.1 ports and the others are skipped. It writes a fleet.yaml whose devices are
verified like real ones (per-device host keys in a known_hosts file, a generated user key).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from deepfleet._files import cache_dir
from deepfleet.errors import DeviceError
from deepfleet.orchestrator.fleet import load_fleet
from deepfleet.sandbox import _cgroup, _device, _roots, _runtimes, _state
from deepfleet.sandbox._kinds import Kind, name_devices
from deepfleet.sandbox._proc import sh
from deepfleet.sandbox._sshd import keygen, known_hosts_entry, sshd_binary

__all__ = ["default_state_dir", "down", "up"]

Echo = Callable[[str], None]


def default_state_dir() -> Path:
    """``$DEEPFLEET_CACHE/sandbox`` or ``~/.cache/deepfleet/sandbox``."""
    return cache_dir() / "sandbox"


def _netns_problem() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) not installed"
    probe = f"deepfleet-probe-{os.getpid()}"
    proc = sh(["ip", "netns", "add", probe], check=False)
    sh(["ip", "netns", "delete", probe], check=False)
    return None if proc.returncode == 0 else f"ip netns add failed: {proc.stderr.strip()}"


def _why_not(kind: Kind, netns_problem: str | None) -> str | None:
    """Why ``kind`` cannot run here (None if it can)."""
    if kind.arch is None and kind.link is None and kind.power is None:
        return None  # plain x86 runs in a namespace or, failing that, on a loopback port
    if netns_problem:
        return f"needs network namespaces ({netns_problem})"
    if kind.link and shutil.which("nft") is None:
        return "needs nftables for packet loss (install nftables)"
    if (kind.cpus is not None or kind.power is not None) and (why := _cgroup.why_unavailable()):
        return f"needs a cgroup CPU quota ({why})"
    if kind.arch:
        if not _roots.tarball_path(kind.arch).exists() and shutil.which("mmdebstrap") is None:
            return f"needs a {kind.arch} root: mmdebstrap not installed and none cached"
        if kind.arch != "i386" and (why := _roots.ensure_binfmt(kind.arch)):
            return f"needs qemu-user via binfmt_misc ({why})"
    return None


def _prepare(arches: set[str], x86: bool,
             echo: Echo) -> tuple[dict[str, Path | str], _runtimes.Interpreter | None]:
    """Build (or find cached) roots and, if ``x86``, the x86 devices' interpreter, in parallel:
    (arch -> tarball or the failure reason, the interpreter)."""
    def root(arch: str) -> Path | str:
        start = time.monotonic()
        try:
            path = _roots.cached_root(arch)
        except DeviceError as exc:
            return str(exc)
        echo(f"root {arch}: {path} ({time.monotonic() - start:.1f} s)")
        return path

    def interpreter() -> _runtimes.Interpreter:
        start = time.monotonic()
        got = _runtimes.x86_interpreter()
        runs = f"numpy + onnxruntime {got.onnxruntime}" if got.onnxruntime else \
            f"numpy only: {got.note}"
        echo(f"x86 python: {got.python} ({runs}) ({time.monotonic() - start:.1f} s)")
        return got

    with ThreadPoolExecutor(max_workers=2) as pool:
        x86_future = pool.submit(interpreter) if x86 else None
        tarballs = dict(zip(sorted(arches), pool.map(root, sorted(arches)), strict=True))
        return tarballs, x86_future.result() if x86_future else None


def _runtime_of(kind: Kind, x86: _runtimes.Interpreter | None) -> dict[str, str | None]:
    """The state's record of which onnxruntime a device of ``kind`` has, or why none."""
    if kind.arch is None:
        assert x86 is not None
        return {"onnxruntime": x86.onnxruntime, "onnxruntime_note": x86.note}
    version = _roots.onnxruntime_in(kind.arch)
    note = None if version else _runtimes.NO_WHEEL.format(machine=_roots.ARCHES[kind.arch][2])
    return {"onnxruntime": version, "onnxruntime_note": note}


def _fleet_entry(rec: dict[str, Any], key: Path, known_hosts: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": rec["name"], "host": rec["host"], "port": rec["port"], "user": rec["user"],
        "key": str(key), "known_hosts": str(known_hosts), "class": rec["device_class"],
        "python": rec["python"], "workdir": rec["workdir"],
        "energy": rec.get("energy") or {"source": "none"},
        "tags": ["sandbox", rec["kind"], rec["mode"]],
    }
    if rec.get("simulated"):
        entry["simulated"] = rec["simulated"]
    return entry


def _write_fleet(directory: Path, records: list[dict[str, Any]], key: Path) -> Path:
    known_hosts = directory / "known_hosts"
    known_hosts.write_text("".join(
        known_hosts_entry(r["host"], r["port"], r["host_public"]) + "\n" for r in records))
    fleet = directory / "fleet.yaml"
    body = yaml.safe_dump({"devices": [_fleet_entry(r, key, known_hosts) for r in records]},
                          sort_keys=False, width=100)
    fleet.write_text("# Generated by `deepfleet fleet sandbox up`; removed by `... down`.\n"
                     "# Devices marked `simulated` are not real hardware in that respect; "
                     "rows measured on them say so.\n" + body)
    load_fleet(fleet)  # what we hand out must pass the same validation as a user's file
    return fleet


def up(devices: Sequence[str] | None = None, *, state_dir: str | Path | None = None,
       loopback: bool = False, echo: Echo | None = None) -> Path:
    """Start sandbox devices of the given kinds (default: x86, x86-slow, edison, arm64) and
    return the path of the generated fleet.yaml.

    With ``loopback`` only sshd servers on 127.0.0.1 ports are used, as without root. A sandbox
    already up in ``state_dir`` is taken down first. Kinds this machine cannot run
    are skipped with a reason (passed to ``echo`` and kept in the state: see
    :func:`deepfleet.sandbox.read_state`). Raises :class:`ConfigError` for an
    unknown kind and :class:`DeviceError` when no device at all could be started.
    """
    say: Echo = echo or (lambda _line: None)
    named = name_devices(devices)
    directory = Path(state_dir or default_state_dir()).expanduser().resolve()
    if _state.load(directory) is not None:
        say(f"taking down the sandbox already in {directory}")
        down(directory, echo=say)
    if sshd_binary() is None:
        raise DeviceError("sandbox: sshd not found; install openssh-server "
                          "(as root: bash scripts/system-deps.sh)")
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"version": 1, "devices": [], "skipped": {}}
    records: list[dict[str, Any]] = state["devices"]

    def commit() -> None:
        _state.save(directory, state)

    netns_problem = "127.0.0.1 ports only were asked for" if loopback else _netns_problem()
    if netns_problem:
        say(f"network namespaces unavailable ({netns_problem}): x86 devices use 127.0.0.1 ports")
    runnable: list[tuple[str, Kind]] = []
    for name, kind in named:
        why = _why_not(kind, netns_problem)
        if why:
            state["skipped"][name] = why
            say(f"skipped {name}: {why}")
        else:
            runnable.append((name, kind))
    commit()
    key = directory / "id_ed25519"
    client_public = keygen(key, "deepfleet-sandbox-user")
    tarballs, x86 = _prepare({k.arch for _, k in runnable if k.arch},
                             any(k.arch is None for _, k in runnable), say)
    for name, kind in runnable:
        tarball = tarballs.get(kind.arch) if kind.arch else None
        if isinstance(tarball, str):
            state["skipped"][name] = f"could not build its {kind.arch} root: {tarball}"
            say(f"skipped {name}: {state['skipped'][name]}")
            continue
        rec: dict[str, Any] = {"name": name, "kind": kind.name, "device_class": kind.device_class,
                               "dir": str(directory / "devices" / name),
                               "simulated": kind.simulated, "started": False,
                               **_runtime_of(kind, x86)}
        records.append(rec)
        start = time.monotonic()
        python = x86.python if x86 and kind.arch is None else None
        try:
            if netns_problem:
                assert python is not None
                _device.start_loopback(rec, state_dir=directory, client_key=key, python=python,
                                       commit=commit)
            else:
                _device.start_netns(rec, kind, state_dir=directory, client_public=client_public,
                                    tarball=tarball, python=python, commit=commit)
        except (DeviceError, OSError) as exc:  # OSError: a cgroup or sysfs write refused
            _device.teardown(rec)
            records.remove(rec)
            state["skipped"][name] = str(exc)
            commit()
            say(f"skipped {name}: {exc}")
            continue
        rec["started"] = True
        commit()
        what = "sshd on a 127.0.0.1 port, as this user" if netns_problem else kind.description
        runs = f"onnxruntime {rec['onnxruntime']}" if rec["onnxruntime"] else "numpy only"
        say(f"started {name} ({what}; {runs}) at {rec['user']}@{rec['host']}:{rec['port']} "
            f"in {time.monotonic() - start:.1f} s")
    if not records:
        raise DeviceError("sandbox: no device could be started: " + "; ".join(
            f"{n}: {why}" for n, why in state["skipped"].items()))
    fleet = _write_fleet(directory, records, key)
    say(f"fleet file: {fleet}")
    return fleet


def down(state_dir: str | Path | None = None, *, echo: Echo | None = None) -> None:
    """Stop every sandbox device recorded in ``state_dir``: kill every process in its namespace,
    delete the namespace, unmount and remove its root, remove its cgroup; then remove the fleet
    file, keys and state. Idempotent. Raises :class:`DeviceError` listing what could not be
    undone (its record is kept so that a second ``down`` can retry)."""
    say: Echo = echo or (lambda _line: None)
    directory = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = _state.load(directory)
    if state is None:
        say(f"no sandbox in {directory}")
        return
    failed: list[str] = []
    for rec in reversed(list(state["devices"])):
        try:
            _device.teardown(rec)
        except DeviceError as exc:
            failed.append(f"{rec['name']}: {exc}")
            continue
        state["devices"].remove(rec)
        _state.save(directory, state)
        say(f"stopped {rec['name']}")
    if failed:
        raise DeviceError("sandbox down left things behind: " + "; ".join(failed))
    for name in ("fleet.yaml", "known_hosts", "id_ed25519", "id_ed25519.pub"):
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(directory / "devices", ignore_errors=True)
    _state.state_file(directory).unlink(missing_ok=True)
