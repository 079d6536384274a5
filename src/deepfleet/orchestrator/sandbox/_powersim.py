"""A SIMULATED hwmon power sensor for a sandbox device (stdlib only; runs as its own process).

The sandbox machines have no power sensors (no powercap, hwmon or power_supply), so this writes
files shaped like a Linux hwmon device::

    <out>/hwmon0/name            deepfleet_sim
    <out>/hwmon0/power1_label    simulated
    <out>/hwmon0/power1_input    microwatts, rewritten atomically sample_hz times a second
    <out>/hwmon0/update_interval milliseconds between updates (as real hwmon devices report)
    <out>/hwmon0/SIMULATED       how the number is made

The power is ``idle_w + active_w * utilisation``, where utilisation is the CPU time the device's
cgroup used in the last interval divided by the CPUs it is allowed. It is a model, not a
measurement: every row measured with it must say so (the fleet file marks the device simulated).
The process ends when its output directory or the cgroup's counter disappears.

    python _powersim.py --usage FILE --out DIR --cpus 0.15 --idle-w 0.35 --active-w 0.65 --hz 20
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path


def read_usage_ns(path: str) -> int:
    """CPU time of the group in ns: cgroup v1 ``cpuacct.usage`` or v2 ``cpu.stat``."""
    text = Path(path).read_text()
    if path.endswith("cpu.stat"):
        for line in text.splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) * 1000
        raise ValueError(f"no usage_usec in {path}")
    return int(text)


def power_uw(util: float, idle_w: float, active_w: float) -> int:
    """Microwatts for a utilisation in [0, 1] (clipped)."""
    return round((idle_w + active_w * min(1.0, max(0.0, util))) * 1e6)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old or the new number, never half of one


def run(usage: str, out: Path, *, cpus: float, idle_w: float, active_w: float, hz: float,
        window_s: float = 0.3) -> None:
    """Write the sensor files every ``1/hz`` s until ``out/hwmon0`` or ``usage`` disappears.

    Utilisation is averaged over the last ``window_s`` seconds, as a real sensor averages: a CPU
    quota runs the device in bursts (e.g. 15 ms of every 100 ms period), and a 50 ms window
    would see only "full" or "idle".
    """
    hwmon = out / "hwmon0"
    hwmon.mkdir(parents=True, exist_ok=True)
    _write(hwmon / "name", "deepfleet_sim\n")
    _write(hwmon / "power1_label", "simulated\n")
    _write(hwmon / "update_interval", f"{round(1000 / hz)}\n")
    _write(hwmon / "SIMULATED", f"power1_input = ({idle_w} W + {active_w} W x CPU utilisation of "
                                f"{cpus} CPUs over {window_s} s) in microwatts; simulated from "
                                f"{usage}\n")
    _write(hwmon / "power1_input", f"{power_uw(0.0, idle_w, active_w)}\n")
    history = collections.deque([(time.monotonic_ns(), read_usage_ns(usage))])
    while hwmon.is_dir():
        time.sleep(1.0 / hz)
        try:
            history.append((time.monotonic_ns(), read_usage_ns(usage)))
        except (OSError, ValueError):
            return  # the device's cgroup is gone: the sandbox is coming down
        while len(history) > 2 and history[-1][0] - history[1][0] >= window_s * 1e9:
            history.popleft()
        (t0, u0), (t1, u1) = history[0], history[-1]
        util = (u1 - u0) / max(1, t1 - t0) / cpus
        try:
            _write(hwmon / "power1_input", f"{power_uw(util, idle_w, active_w)}\n")
        except FileNotFoundError:
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="simulated hwmon power sensor")
    parser.add_argument("--usage", required=True, help="cgroup CPU-time counter file")
    parser.add_argument("--out", required=True, type=Path, help="directory to hold hwmon0/")
    parser.add_argument("--cpus", type=float, default=1.0)
    parser.add_argument("--idle-w", type=float, default=0.35)
    parser.add_argument("--active-w", type=float, default=0.65)
    parser.add_argument("--hz", type=float, default=20.0)
    args = parser.parse_args(argv)
    run(args.usage, args.out, cpus=args.cpus, idle_w=args.idle_w, active_w=args.active_w,
        hz=args.hz)


if __name__ == "__main__":
    main()
