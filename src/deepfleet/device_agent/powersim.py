"""A SIMULATED hwmon power sensor, for tests and sandbox devices that have no real one.

Standard library only, Python >= 3.8 (it can be copied into a device root and run there); it
is NOT part of the shipped agent. It maintains files shaped like a Linux hwmon device, so the agent
reads it through its real hwmon code path (``energy: {"source": "hwmon", "path": DIR}``)::

    DIR/hwmon0/name             deepfleet_sim      (the agent marks readings from it simulated)
    DIR/hwmon0/power1_label     simulated
    DIR/hwmon0/power1_input     microwatts, replaced atomically ``hz`` times a second
    DIR/hwmon0/update_interval  the averaging window in ms (as an INA2xx driver reports it)
    DIR/hwmon0/SIMULATED        how the number is made

Power = ``idle_w + active_w * utilisation``. Utilisation is the CPU time used over the last
``window_s`` seconds divided by ``cpus`` (clipped to [0, 1]), taken from one of:

* ``pids``: the given processes, all their threads (``/proc/PID/task/*/schedstat``, ns
  resolution; ``/proc/PID/stat`` clock ticks where schedstat is missing);
* ``usage``: a cgroup CPU-time counter (v1 ``cpuacct.usage`` ns, or v2 ``cpu.stat``);
* neither: the whole machine from ``/proc/stat`` (``cpus`` then defaults to the CPU count).

The utilisation is averaged over a window, as real sensors average: a 10 ms scheduler tick or a
CPU quota's bursts would otherwise show as "full" or "idle". It is a model, not a measurement:
every result measured with it is labelled simulated. The process ends when ``DIR/hwmon0`` is
removed, after ``duration`` seconds, or on SIGTERM/SIGINT.

    python powersim.py --out DIR [--pid PID ...| --usage FILE] [--idle-w 0.5] [--active-w 2.0]
                       [--cpus 1] [--hz 50] [--window-s 0.2] [--duration S]
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["SIM_NAME", "cpu_seconds_machine", "cpu_seconds_of_pids", "cpu_seconds_of_usage",
           "power_uw", "run", "spawn", "main"]

SIM_NAME = "deepfleet_sim"  # energy.py's SIM_HWMON_NAME: readings from it are labelled simulated
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _task_seconds(pid: int) -> float:
    """CPU seconds of every live thread of ``pid`` (0.0 once the process is gone)."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9  # ns on CPU
        except (OSError, ValueError, IndexError):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    # Fields after the ")" that closes the command name: utime is the 12th.
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _TICK
            except (OSError, ValueError, IndexError):
                pass  # the thread ended between listdir and open
    return total


def cpu_seconds_of_pids(pids: Sequence[int]) -> float:
    """Cumulative CPU seconds of ``pids`` (all threads)."""
    return sum(_task_seconds(p) for p in pids)


def cpu_seconds_of_usage(path: str) -> float:
    """Cumulative CPU seconds of a cgroup: v1 ``cpuacct.usage`` (ns) or v2 ``cpu.stat``."""
    with open(path) as f:
        text = f.read()
    if path.endswith("cpu.stat"):
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise ValueError(f"no usage_usec line in {path}")
    return int(text) / 1e9


def cpu_seconds_machine() -> float:
    """Cumulative busy CPU seconds of the whole machine (all CPUs) from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / _TICK


def power_uw(util: float, idle_w: float, active_w: float) -> int:
    """Microwatts for a utilisation (clipped to [0, 1])."""
    return round((idle_w + active_w * min(1.0, max(0.0, util))) * 1e6)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader sees the old or the new number, never half of one


def run(out: str | os.PathLike[str], counter: Callable[[], float], *, cpus: float,
        idle_w: float, active_w: float, hz: float, window_s: float, source: str,
        duration: float | None = None) -> None:
    """Write the sensor under ``out/hwmon0`` every ``1/hz`` s until it is removed or time is up.

    ``counter()`` returns cumulative CPU seconds; ``source`` describes it (written to SIMULATED).
    """
    hwmon = Path(out) / "hwmon0"
    hwmon.mkdir(parents=True, exist_ok=True)
    _write(hwmon / "name", SIM_NAME + "\n")
    _write(hwmon / "power1_label", "simulated\n")
    # A reading reflects the last window_s: that, not 1/hz, is how long it trails the load.
    _write(hwmon / "update_interval", f"{round(1000 * max(window_s, 1 / hz))}\n")
    _write(hwmon / "SIMULATED", "a simulated power sensor (deepfleet powersim), not a meter: "
                                f"power1_input = ({idle_w} W + {active_w} W x CPU utilisation of "
                                f"{cpus} CPUs over {window_s} s) in microwatts; CPU time from "
                                f"{source}\n")
    history = collections.deque([(time.monotonic(), counter())])
    _write(hwmon / "power1_input", f"{power_uw(0.0, idle_w, active_w)}\n")
    end = None if duration is None else time.monotonic() + duration
    next_t = time.monotonic()
    while hwmon.is_dir() and (end is None or time.monotonic() < end):
        next_t = max(next_t + 1.0 / hz, time.monotonic())
        time.sleep(max(0.0, next_t - time.monotonic()))
        try:
            history.append((time.monotonic(), counter()))
        except (OSError, ValueError):
            return  # the cgroup went away: the sandbox device is coming down
        while len(history) > 2 and history[-1][0] - history[1][0] >= window_s:
            history.popleft()
        (t0, c0), (t1, c1) = history[0], history[-1]
        util = (c1 - c0) / max(1e-9, t1 - t0) / cpus  # a dead pid makes this < 0: clipped
        try:
            _write(hwmon / "power1_input", f"{power_uw(util, idle_w, active_w)}\n")
        except FileNotFoundError:
            return


def spawn(out: str | os.PathLike[str], *, pids: Sequence[int] = (), usage: str | None = None,
          idle_w: float = 0.5, active_w: float = 2.0, cpus: float | None = None, hz: float = 50.0,
          window_s: float = 0.2, python: str = sys.executable,
          timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Start the simulator as its own process; return once ``power1_input`` exists.

    The caller owns the process: ``terminate()`` and ``wait()`` it (or remove ``out/hwmon0``).
    Raises RuntimeError if it dies or does not start within ``timeout`` seconds.
    """
    argv = [python, os.path.abspath(__file__), "--out", str(out), "--idle-w", str(idle_w),
            "--active-w", str(active_w), "--hz", str(hz), "--window-s", str(window_s)]
    argv += [a for p in pids for a in ("--pid", str(p))]
    if usage is not None:
        argv += ["--usage", usage]
    if cpus is not None:
        argv += ["--cpus", str(cpus)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    target = Path(out) / "hwmon0" / "power1_input"
    deadline = time.monotonic() + timeout
    while not target.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"powersim exited with status {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"powersim did not create {target} within {timeout} s")
        time.sleep(0.01)
    return proc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="simulated hwmon power sensor (labelled simulated)")
    parser.add_argument("--out", required=True, help="directory that will hold hwmon0/")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pid", type=int, action="append", default=[],
                       help="a process whose CPU time drives the power (repeatable)")
    group.add_argument("--usage", help="a cgroup CPU-time counter file (cpuacct.usage or cpu.stat)")
    parser.add_argument("--idle-w", type=float, default=0.5, help="power at zero utilisation (W)")
    parser.add_argument("--active-w", type=float, default=2.0, help="extra power at full use (W)")
    parser.add_argument("--cpus", type=float, default=None,
                        help="CPUs that make 100 %% (default 1; the CPU count for the machine)")
    parser.add_argument("--hz", type=float, default=50.0, help="updates per second")
    parser.add_argument("--window-s", type=float, default=0.2, help="utilisation averaging window")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many s")
    args = parser.parse_args(argv)
    if args.hz <= 0 or args.window_s <= 0 or (args.cpus is not None and args.cpus <= 0):
        parser.error(f"--hz, --window-s and --cpus must be > 0, but got (hz={args.hz}, "
                     f"window_s={args.window_s}, cpus={args.cpus})")
    if args.pid:
        pids = tuple(args.pid)
        counter: Callable[[], float] = lambda: cpu_seconds_of_pids(pids)  # noqa: E731
        source, cpus = "pids " + ",".join(map(str, pids)), args.cpus or 1.0
    elif args.usage:
        usage = args.usage
        counter = lambda: cpu_seconds_of_usage(usage)  # noqa: E731
        source, cpus = usage, args.cpus or 1.0
    else:
        counter, source = cpu_seconds_machine, "/proc/stat (whole machine)"
        cpus = args.cpus or float(os.cpu_count() or 1)
    # SIGTERM ends the loop through KeyboardInterrupt so the process exits 0, quietly.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(args.out, counter, cpus=cpus, idle_w=args.idle_w, active_w=args.active_w, hz=args.hz,
            window_s=args.window_s, source=source, duration=args.duration)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
