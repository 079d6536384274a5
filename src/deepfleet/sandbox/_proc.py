"""Host-side process helpers for the sandbox: run a command, find and kill process trees."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from deepfleet.errors import DeviceError

__all__ = ["descendants", "kill_pids", "kill_tree", "sh", "wait_for_file"]


def sh(argv: Sequence[str], *, timeout: float = 300.0, check: bool = True,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` on this machine (no shell) and return the completed process.

    With ``check`` a non-zero exit raises :class:`DeviceError` naming the command, its status and
    the end of its stderr; a missing program or a timeout raises it too.
    """
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input)
    except FileNotFoundError as exc:
        raise DeviceError(f"sandbox: program {argv[0]!r} not found (run scripts/system-deps.sh "
                          "as root to install what the sandbox needs)") from exc
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"sandbox: {list(argv)!r} did not finish within {timeout:g} s") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()[-800:]
        raise DeviceError(f"sandbox: {list(argv)!r} exited with status {proc.returncode}: {err}")
    return proc


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # the process ended while we looked
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (children, grandchildren, ...), not ``pid`` itself."""
    children = _ppid_map()
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_pids(pids: Iterable[int], *, wait: float = 5.0) -> None:
    """SIGKILL every pid (gone ones are ignored) and wait up to ``wait`` s for them to vanish."""
    pids = [p for p in pids if p > 1]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    end = time.monotonic() + wait
    for pid in pids:
        while time.monotonic() < end:
            try:
                # Reap it if it is our child; otherwise just check that it is gone.
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                if not Path(f"/proc/{pid}").exists():
                    break
                state = _state(pid)
                if state in ("Z", None):
                    break
            time.sleep(0.01)


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def kill_tree(pid: int) -> None:
    """Kill ``pid`` and everything it started (as a dead device would lose them all)."""
    kill_pids([*descendants(pid), pid])


def wait_for_file(path: Path, *, timeout: float, alive: subprocess.Popen[bytes] | None = None,
                  what: str = "file") -> None:
    """Wait until ``path`` exists and is non-empty; raise DeviceError after ``timeout`` s or as
    soon as ``alive`` (the process that should write it) has exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.stat().st_size > 0:
            return
        if alive is not None and alive.poll() is not None:
            raise DeviceError(f"sandbox: {what} exited with status {alive.returncode} before "
                              f"writing {path}")
        time.sleep(0.02)
    raise DeviceError(f"sandbox: {what} did not write {path} within {timeout:g} s")
