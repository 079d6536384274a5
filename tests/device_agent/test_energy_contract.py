"""The EnergySource contract: every kind of meter the agent reads passes the same tests.

One parametrized fixture gives a live meter of each implementation at a known, constant power:

* ``hwmon``: the simulated sensor (``powersim.py``) driven by a sleeping process (its idle power);
* ``power_supply``: a battery's ``power_now`` in a sysfs tree the test writes;
* ``rapl``: a powercap ``energy_uj`` counter that a thread advances (and wraps) in real time;
* ``command-W`` / ``command-J``: a small meter script printing watts / cumulative joules.

The agent opens each through its real finders (``open_energy_source``) and reads it with its
real sampler; the readings must add up to the meter's power.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deepfleet.device_agent import energy as E
from deepfleet.device_agent import powersim
from deepfleet.device_agent.protocol import parse_energy


@dataclass
class Meter:
    """A live meter and what the agent should make of it."""

    spec: dict[str, Any]  # the request's energy settings that select it
    cls: type[E.EnergySource]
    source: str
    kind: str  # "power" (watts) or "energy" (cumulative joules)
    watts: float  # the constant power it reports
    simulated: bool
    breaks: Callable[[], None]  # make it unreadable


def _write(path: Path, text: str) -> None:
    """Replace a file atomically: a reader never sees half a number (as with real sysfs)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Counter(threading.Thread):
    """Writes ``scale * joules`` (modulo ``wrap``) to ``path`` every few ms, at ``watts``."""

    def __init__(self, path: Path, watts: float, scale: float, wrap: float | None = None) -> None:
        super().__init__(daemon=True)
        self.path, self.watts, self.scale, self.wrap = path, watts, scale, wrap
        self.halt = threading.Event()
        self.t0 = time.monotonic()
        self._tick()

    def _tick(self) -> None:
        value = self.watts * (time.monotonic() - self.t0) * self.scale
        if self.wrap:
            value %= self.wrap
        _write(self.path, f"{value:.0f}\n" if self.scale > 1 else f"{value:.9f}\n")

    def run(self) -> None:
        while not self.halt.wait(0.005):
            self._tick()

    def stop(self) -> None:
        self.halt.set()
        self.join()


METER_SCRIPT = """#!/bin/sh
# A stand-in for an external meter: prints the number in the state file with a label.
set -e
value=$(cat "$1")
echo "reading: $value"
"""

KINDS = ["hwmon", "power_supply", "rapl", "command-W", "command-J"]


@pytest.fixture(params=KINDS)
def meter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Meter]:
    kind = request.param
    cleanup: list[Callable[[], None]] = []

    def counter(path: Path, watts: float, scale: float, wrap: float | None = None) -> Counter:
        c = Counter(path, watts, scale, wrap)
        c.start()
        cleanup.append(c.stop)
        return c

    if kind == "hwmon":
        sleeper = subprocess.Popen(["sleep", "600"])
        cleanup.append(lambda: (sleeper.kill(), sleeper.wait()))
        sim = tmp_path / "sim"  # its power: idle, since the process it follows sleeps
        proc = powersim.spawn(sim, pids=[sleeper.pid], idle_w=0.5, active_w=2.0, hz=50,
                              window_s=0.2)
        cleanup.append(lambda: (proc.terminate(), proc.wait(10)))

        def stop_sim() -> None:
            proc.terminate()
            proc.wait(10)
            (sim / "hwmon0" / "power1_input").unlink()

        yield Meter({"source": "hwmon", "path": str(sim)}, E.HwmonSource, "hwmon", "power", 0.5,
                    True, stop_sim)
    elif kind == "power_supply":
        bat = tmp_path / "power_supply" / "BAT0"
        bat.mkdir(parents=True)
        for name, text in {"type": "Battery", "status": "Discharging", "power_now": "2500000"}.items():
            _write(bat / name, text + "\n")
        yield Meter({"source": "power_supply", "path": str(bat.parent)}, E.PowerSupplySource,
                    "power_supply", "power", 2.5, False, lambda: (bat / "power_now").unlink())
    elif kind == "rapl":
        zone = tmp_path / "powercap" / "intel-rapl:0"
        zone.mkdir(parents=True)
        _write(zone / "name", "package-0\n")
        _write(zone / "max_energy_range_uj", "1500000\n")  # 1.5 J: wraps every 0.5 s at 3 W
        c = counter(zone / "energy_uj", 3.0, 1e6, wrap=1.5e6)
        yield Meter({"source": "rapl", "path": str(zone.parent)}, E.RaplSource, "rapl", "energy",
                    3.0, False, lambda: (c.stop(), (zone / "energy_uj").unlink()))
    else:
        unit = kind[-1]
        script = tmp_path / "meter.sh"
        script.write_text(METER_SCRIPT)
        script.chmod(0o755)
        state = tmp_path / "state"
        if unit == "W":
            _write(state, "1.5\n")
            stop: Callable[[], object] = lambda: None  # noqa: E731
        else:
            stop = counter(state, 2.0, 1.0).stop
        yield Meter({"source": "command", "command": [str(script), str(state)], "unit": unit},
                    E.CommandSource, "command", "power" if unit == "W" else "energy",
                    1.5 if unit == "W" else 2.0, False, lambda: (stop(), state.unlink()))
    for fn in reversed(cleanup):
        fn()


def _open(meter: Meter, **override: Any) -> E.EnergySource:
    source, note = E.open_energy_source(parse_energy({**meter.spec, **override}))
    assert source is not None, note
    return source


def _sample(source: E.EnergySource, seconds: float, hz: float = 20.0) -> E.Sampler:
    sampler = E.Sampler(source, hz)
    sampler.start()
    assert sampler.first.wait(10)
    time.sleep(seconds)
    sampler.stop()
    return sampler


def test_a_meter_without_read_cannot_be_made() -> None:
    class Silent(E.EnergySource):
        source = "silent"

    with pytest.raises(TypeError, match="abstract"):
        Silent()  # type: ignore[abstract]


def test_it_opens_as_its_kind_of_meter_named_or_found(meter: Meter) -> None:
    source = _open(meter)
    assert isinstance(source, E.EnergySource) and type(source) is meter.cls
    assert source.source == meter.source and source.kind == meter.kind
    d = source.describe()
    json.dumps(d)  # plain data: it goes into a response
    assert d["source"] == meter.source and d["kind"] == meter.kind
    assert d["simulated"] is meter.simulated and isinstance(d["sensor"], str) and d["sensor"]
    assert 0 <= d["lag_s"] <= 2.0
    # "auto" finds the same meter (a command is taken when one is given)
    assert type(_open(meter, source="auto")) is meter.cls


def test_readings_are_plausible_numbers_at_the_meter_power(meter: Meter) -> None:
    source = _open(meter)
    readings, times = [], []
    for _ in range(6):
        readings.append(source.read())
        times.append(time.perf_counter())
        time.sleep(0.05)
    elapsed = times[-1] - times[0]
    assert all(isinstance(r, float) and math.isfinite(r) and r >= 0 for r in readings)
    if meter.kind == "power":  # watts, as the meter says
        assert readings == pytest.approx([meter.watts] * len(readings), rel=1e-3)
    else:  # a counter in joules: never decreasing (also across a wrap), rising at the power
        assert all(b >= a for a, b in zip(readings, readings[1:]))
        rise = (readings[-1] - readings[0]) / elapsed
        assert rise == pytest.approx(meter.watts, rel=0.3)


def test_sampling_integrates_to_the_meter_power(meter: Meter) -> None:
    source = _open(meter)
    sampler = _sample(source, 0.6)
    assert sampler.error is None
    times = [t for t, _ in sampler.samples]
    assert len(times) >= 5 and all(b > a for a, b in zip(times, times[1:]))
    joules, span = E.integrate(sampler.samples, source.kind)
    assert span > 0.5 and joules / span == pytest.approx(meter.watts, rel=0.2)


def test_the_energy_result_labels_its_kind_and_subtracts_idle(meter: Meter) -> None:
    spec = parse_energy(meter.spec)
    source = _open(meter)
    idle = E.sample_idle(source, 20.0, 0.3)
    assert idle[2] is None and idle[0] == pytest.approx(meter.watts, rel=0.2)
    sampler = E.Sampler(source, 20.0)
    sampler.start()
    sampler.first.wait(10)
    start = time.perf_counter()
    time.sleep(0.4)  # the "timed runs", at the same constant power
    end = time.perf_counter()
    time.sleep(source.lag_s)  # as the agent does: the sensor still owes the last readings
    sampler.stop()
    out = E.energy_result(spec, source, None, idle, sampler, (start, end), 4, None)
    assert out["error"] is None, out
    assert out["kind"] == ("simulated" if meter.simulated else "measured")
    assert out["simulated"] is meter.simulated and out["source"] == meter.source
    assert out["samples"] >= 3 and out["active_power_w"] == pytest.approx(meter.watts, rel=0.2)
    # idle and active power are the same here: next to nothing is left per inference
    assert abs(out["net_energy_j"]) <= 0.2 * meter.watts * out["window_s"]


def test_an_unreadable_meter_raises_and_the_sampler_keeps_the_error(meter: Meter) -> None:
    source = _open(meter)
    meter.breaks()
    with pytest.raises((OSError, ValueError)):
        source.read()
    sampler = _sample(source, 0.1)  # the measurement goes on without energy, saying why
    assert sampler.error and sampler.samples == []
