"""Part of the device program: energy sources (the meters a device has), sampling them during a
measurement, and the ``energy`` object of a measure response.

Python >= 3.8, standard library + the agent's libraries; inlined into the one file
shipped to devices (see ``bundle.py``). Host code does not import it. Sources: Linux powercap
(RAPL) energy counters, hwmon power or current x voltage sensors (INA2xx; also the simulated
sensor of ``powersim.py``), power_supply (battery) readings, and an external meter command.
Energy has kinds: "measured" (a real sensor), "simulated" (a sensor that is a model) and
"estimated" (no sensor: an operation-count estimate), and a response never mixes them.
"""

import abc
import os
import re
import shlex
import subprocess
import threading
import time

from deepfleet.device_agent.protocol import (
    ADD_PJ,
    DRAM_PJ_PER_32BIT,
    ESTIMATE_BASIS,
    MULT_PJ,
    AgentError,
    finite,
)
from deepfleet.device_agent.system import natural_key, read_number, read_number_strict, read_text

ENERGY_ROOTS = {"rapl": "/sys/class/powercap", "hwmon": "/sys/class/hwmon",
                "power_supply": "/sys/class/power_supply"}
SIM_HWMON_NAME = "deepfleet_sim"  # the name powersim.py gives its hwmon device


class EnergySource(abc.ABC):
    """A power meter: the plug-in point for energy sources.

    ``read()`` returns watts (``kind`` "power") or a cumulative counter in joules (``kind``
    "energy", never decreasing: a counter that wraps is unwrapped); it raises OSError/ValueError
    when the sensor cannot be read. A constructor reads once, so a source that exists can be
    read. ``source`` names the kind of meter (rapl, hwmon, power_supply, command), ``path`` and
    ``sensor`` say which one. ``sim_hint`` is a note when the sensor itself says that it is
    simulated. ``lag_s`` is how long a reading trails the load: a sensor that averages over a
    window (hwmon's ``update_interval``) reports a change only after it; the agent shifts its
    window by that."""

    source = None
    kind = "power"
    path = None
    sensor = None
    sim_hint = None
    lag_s = 0.0

    @abc.abstractmethod
    def read(self):
        """Watts now (kind "power") or joules so far (kind "energy")."""

    def describe(self):
        """Plain data for responses: source, path, sensor, kind, simulated, lag_s."""
        return {"source": self.source, "path": self.path, "sensor": self.sensor,
                "kind": self.kind, "simulated": self.sim_hint is not None, "lag_s": self.lag_s}


def _sensor_dirs(root, has_sensor):
    """[root] when ``root`` is itself a sensor dir, else its sensor subdirectories, sorted."""
    if not os.path.isdir(root):
        raise ValueError("%s does not exist" % root)
    if has_sensor(root):
        return [root]
    dirs = [os.path.join(root, d) for d in os.listdir(root)]
    return sorted((d for d in dirs if os.path.isdir(d) and has_sensor(d)), key=natural_key)


_HWMON_FILE = re.compile(r"^(power|curr|in)(\d+)_(input|average)$")


def _hwmon_channels(directory):
    """{"power": {index: file}, "curr": {index: file}, "in": {index: file}} of a hwmon dir."""
    found = {"power": {}, "curr": {}, "in": {}}
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in sorted(names):
        m = _HWMON_FILE.match(name)
        if m:
            # Prefer *_input (instantaneous) over *_average when a channel has both.
            slot = found[m.group(1)]
            if int(m.group(2)) not in slot or m.group(3) == "input":
                slot[int(m.group(2))] = os.path.join(directory, name)
    return found


class HwmonSource(EnergySource):
    """A hwmon power channel (``powerN_input`` µW) or current x voltage (``currN_input`` mA x
    ``inN_input`` mV, the INA2xx/INA3221 layout where inN is the bus voltage of channel N)."""

    source = "hwmon"

    def __init__(self, directory, channel=None):
        ch = _hwmon_channels(directory)
        name = read_text(os.path.join(directory, "name"))
        self.path = directory
        if channel:
            kind, index = re.match(r"^(power|curr)(\d+)$", channel).groups()
            index = int(index)
        elif ch["power"]:
            kind, index = "power", min(ch["power"])
        else:
            pairs = sorted(set(ch["curr"]) & set(ch["in"]))
            if not pairs:
                raise ValueError("hwmon %s (%s) has no power*_input nor curr*_input with in*_input"
                                 % (directory, name))
            kind, index = "curr", pairs[0]
        if kind == "power":
            if index not in ch["power"]:
                raise ValueError("hwmon %s (%s) has no power%d_input" % (directory, name, index))
            self.files = (ch["power"][index],)
            self.sensor = "%s power%d" % (name, index)
        else:
            if index not in ch["curr"] or index not in ch["in"]:
                raise ValueError("hwmon %s (%s) lacks curr%d_input or in%d_input"
                                 % (directory, name, index, index))
            self.files = (ch["curr"][index], ch["in"][index])
            self.sensor = "%s curr%d x in%d" % (name, index, index)
        label = (read_text(os.path.join(directory, "%s%d_label" % (kind, index))) or "").lower()
        if name == SIM_HWMON_NAME or os.path.exists(os.path.join(directory, "SIMULATED")) \
                or "simulated" in label:
            self.sim_hint = "hwmon %s says it is simulated" % (name,)
        interval_ms = read_number(os.path.join(directory, "update_interval"))
        if interval_ms is not None and interval_ms > 0:
            self.lag_s = min(2.0, interval_ms / 1000.0)  # bounded: a bogus value must not stall
        self.read()  # fail now, not during the measurement

    def read(self):
        if len(self.files) == 1:
            return read_number_strict(self.files[0]) / 1e6  # µW
        return abs(read_number_strict(self.files[0]) * read_number_strict(self.files[1])) / 1e6  # mA x mV


def find_hwmon(root, channel=None):
    dirs = _sensor_dirs(root, lambda d: any(_hwmon_channels(d)[k] for k in ("power", "curr")))
    reasons = []
    for d in dirs:
        try:
            return HwmonSource(d, channel)
        except (OSError, ValueError) as exc:
            reasons.append(str(exc))
    raise ValueError("no usable hwmon power sensor under %s%s"
                     % (root, (": " + "; ".join(reasons)) if reasons else ""))


class PowerSupplySource(EnergySource):
    """A power_supply (battery): ``power_now`` µW, or ``current_now`` µA x ``voltage_now`` µV.

    Only meaningful while the device runs from it (status Discharging); ``describe`` says the
    status so that a charging battery is not mistaken for the load."""

    source = "power_supply"

    def __init__(self, directory):
        self.path = directory
        p = os.path.join(directory, "power_now")
        if os.path.isfile(p):
            self.files = (p,)
            self.sensor = "%s power_now" % os.path.basename(directory)
        else:
            self.files = (os.path.join(directory, "current_now"), os.path.join(directory, "voltage_now"))
            self.sensor = "%s current_now x voltage_now" % os.path.basename(directory)
        self.read()

    def read(self):
        if len(self.files) == 1:
            return abs(read_number_strict(self.files[0])) / 1e6
        # Drivers sign the current by direction; the magnitude is the load.
        return abs(read_number_strict(self.files[0]) * read_number_strict(self.files[1])) / 1e12

    def describe(self):
        d = EnergySource.describe(self)
        d["status"] = read_text(os.path.join(self.path, "status"))
        return d


def _has_power_supply(d):
    return os.path.isfile(os.path.join(d, "power_now")) or (
        os.path.isfile(os.path.join(d, "current_now")) and os.path.isfile(os.path.join(d, "voltage_now")))


def find_power_supply(root, channel=None):
    reasons = []
    for d in _sensor_dirs(root, _has_power_supply):
        try:
            return PowerSupplySource(d)
        except (OSError, ValueError) as exc:
            reasons.append("%s: %s" % (d, exc))
    raise ValueError("no readable power_supply with power_now or current_now+voltage_now under %s%s"
                     % (root, (": " + "; ".join(reasons)) if reasons else ""))


class RaplSource(EnergySource):
    """Linux powercap (RAPL) ``energy_uj`` counters of the top-level zones, summed.

    A counter wraps at ``max_energy_range_uj``; the source is sampled often enough (at least
    every few seconds) that at most one wrap happens between two reads, and adds the range back.
    """

    source = "rapl"
    kind = "energy"

    def __init__(self, zones):
        self.zones = zones
        self.path = zones[0] if len(zones) == 1 else os.path.dirname(zones[0])
        self.sensor = "+".join(read_text(os.path.join(z, "name")) or os.path.basename(z) for z in zones)
        self.ranges = [read_number(os.path.join(z, "max_energy_range_uj")) for z in zones]
        self.last = [None] * len(zones)
        self.total_uj = 0.0
        self.read()

    def read(self):
        for i, z in enumerate(self.zones):
            raw = read_number_strict(os.path.join(z, "energy_uj"))
            if self.last[i] is not None:
                delta = raw - self.last[i]
                if delta < 0 and self.ranges[i]:
                    delta += self.ranges[i]  # the counter wrapped
                self.total_uj += delta
            self.last[i] = raw
        return self.total_uj / 1e6


def find_rapl(root, channel=None):
    if os.path.isfile(os.path.join(root, "energy_uj")):
        zones = [root]
    else:
        if not os.path.isdir(root):
            raise ValueError("%s does not exist" % root)
        # Top-level zones only ("intel-rapl:0", not "intel-rapl:0:1", whose energy is inside
        # its parent's): summing both would count the cores twice.
        zones = sorted((os.path.join(root, d) for d in os.listdir(root)
                        if re.match(r"^[\w-]+:\d+$", d) and os.path.isfile(os.path.join(root, d, "energy_uj"))),
                       key=natural_key)
        packages = [z for z in zones if (read_text(os.path.join(z, "name")) or "").startswith("package")]
        zones = packages or zones
    if not zones:
        raise ValueError("no powercap zone with energy_uj under %s" % root)
    try:
        return RaplSource(zones)
    except PermissionError:
        raise ValueError("powercap energy_uj under %s is readable by root only (since Linux 5.10):"
                         " run the agent as root or make the file readable" % root) from None


class CommandSource(EnergySource):
    """An external meter: runs ``argv`` per sample and takes the first number on its stdout
    (watts, or cumulative joules with unit "J"; see the protocol comment)."""

    source = "command"
    _NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

    def __init__(self, argv, unit):
        self.argv = list(argv)
        self.kind = "power" if unit == "W" else "energy"
        self.path = None
        self.sensor = " ".join(shlex.quote(a) for a in self.argv)
        self.read()

    def read(self):
        try:
            out = subprocess.run(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, timeout=5.0)
        except subprocess.TimeoutExpired:
            raise OSError("meter command %s took over 5 s" % self.sensor) from None
        if out.returncode != 0:
            raise OSError("meter command %s exited %d: %s" % (
                self.sensor, out.returncode, out.stderr.decode("utf-8", "replace").strip()[-200:]))
        text = out.stdout.decode("utf-8", "replace")
        m = self._NUMBER_RE.search(text)
        if m is None:
            raise ValueError("meter command %s printed no number: %r" % (self.sensor, text[:100]))
        return float(m.group(0))


FINDERS = {"rapl": find_rapl, "hwmon": find_hwmon, "power_supply": find_power_supply}


def open_energy_source(spec):
    """(EnergySource or None, note) for the request's energy settings.

    ``auto`` tries rapl, hwmon, power_supply in that order (a command when one is given) and
    returns (None, why) when none is there. An explicitly named source that is missing or
    unreadable raises AgentError(energy_unavailable) before anything is measured.
    """
    source = spec["source"]
    if source == "none":
        return None, "energy source 'none' requested"
    if source == "command" or (source == "auto" and spec["command"]):
        try:
            return CommandSource(spec["command"], spec["unit"]), None
        except (OSError, ValueError) as exc:
            raise AgentError("energy_unavailable", "energy meter command failed its first reading "
                             "(%s); fix energy.command in the fleet file" % exc) from None
    order = ("rapl", "hwmon", "power_supply") if source == "auto" else (source,)
    reasons = []
    for name in order:
        root = spec["path"] or ENERGY_ROOTS[name]
        try:
            return FINDERS[name](root, spec["channel"]), None
        except (OSError, ValueError) as exc:
            reasons.append("%s: %s" % (name, exc))
    if source == "auto":
        return None, "no energy sensor found (%s)" % "; ".join(reasons)
    raise AgentError("energy_unavailable", "energy source %r is not usable (%s); fix energy.path "
                     "in the fleet file, or use source 'auto' or 'none'" % (source, "; ".join(reasons)))


def list_energy_sources(extra_path=None):
    """describe() of every sensor found at the standard places (and ``extra_path``)."""
    found, notes = [], []
    roots = [(name, ENERGY_ROOTS[name]) for name in ("rapl", "hwmon", "power_supply")]
    if extra_path:
        roots += [(name, extra_path) for name in ("rapl", "hwmon", "power_supply")]
    for name, root in roots:
        if not os.path.isdir(root):
            continue
        try:
            found.append(FINDERS[name](root).describe())
        except (OSError, ValueError) as exc:
            if extra_path and root == extra_path:
                notes.append("%s: %s" % (name, exc))
    return found, notes


class Sampler(threading.Thread):
    """Reads an EnergySource every 1/hz s in a background thread, from start() until stop().

    ``samples`` holds (perf_counter s, value); the first reading is taken at once (``first``
    is set then) and a last one at stop(), so the samples span the whole window. A read error
    stops sampling and is kept in ``error``; the measurement goes on without energy.
    The thread needs the GIL only for a file read per sample (tens of µs).
    """

    def __init__(self, source, hz):
        threading.Thread.__init__(self, name="energy-sampler", daemon=True)
        self.source = source
        self.period = 1.0 / hz
        self.samples = []
        self.error = None
        self.first = threading.Event()
        self._halt = threading.Event()

    def _sample(self):
        a = time.perf_counter()
        value = self.source.read()
        self.samples.append((0.5 * (a + time.perf_counter()), value))

    def run(self):
        try:
            self._sample()
            self.first.set()
            next_t = time.perf_counter()
            while True:
                # Keep the schedule (a sample delayed by the GIL is followed by a prompt one)
                # but never burst to catch up on more than one missed period.
                next_t = max(next_t + self.period, time.perf_counter() - self.period)
                if self._halt.wait(max(0.0, next_t - time.perf_counter())):
                    self._sample()
                    return
                self._sample()
        except Exception as exc:  # a sensor that fails mid-run: report it, keep the latencies
            self.error = "%s: %s" % (type(exc).__name__, exc)
        finally:
            self.first.set()

    def stop(self):
        self._halt.set()
        self.join()


def _clip(samples, start, end):
    """``samples`` restricted to [start, end], with values interpolated at the two ends."""
    def at(t):
        for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
            if t0 <= t <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return None
    start, end = max(start, samples[0][0]), min(end, samples[-1][0])
    if end <= start:
        return []
    inner = [s for s in samples if start < s[0] < end]
    return [(start, at(start))] + inner + [(end, at(end))]


def integrate(samples, kind, start=None, end=None):
    """(joules, seconds) over [start, end] (default: the samples' span): trapezoids of watts,
    or a counter's rise."""
    if len(samples) >= 2 and (start is not None or end is not None):
        samples = _clip(samples, samples[0][0] if start is None else start,
                        samples[-1][0] if end is None else end)
    if len(samples) < 2:
        return None, 0.0
    seconds = samples[-1][0] - samples[0][0]
    if kind == "energy":
        return samples[-1][1] - samples[0][1], seconds
    joules = 0.0
    for (t0, p0), (t1, p1) in zip(samples, samples[1:]):
        joules += (t1 - t0) * 0.5 * (p0 + p1)
    return joules, seconds


def sample_idle(source, hz, seconds):
    """(mean idle power W or None, samples, error) over ``seconds`` with the agent idle.

    Waits ``source.lag_s`` first, so that the sensor's averaging window no longer holds the
    agent's own work (loading the model, the previous request).
    """
    time.sleep(source.lag_s)
    sampler = Sampler(source, hz)
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    if sampler.error:
        return None, len(sampler.samples), sampler.error
    joules, span = integrate(sampler.samples, source.kind)
    if joules is None or span <= 0:
        return None, len(sampler.samples), "too few idle samples"
    return joules / span, len(sampler.samples), None


def estimate_energy_mj(manifest, batch):
    """Energy of one run of ``batch`` samples from operation counts (DESIGN §6 table), in mJ.

    batch x MACs x (MULT 3.7 + ADD 0.9) pJ + params x 640 pJ: every float32 weight is fetched
    from DRAM once per run (the numpy runtime holds weights as float32, also quantised ones);
    activations are assumed on-chip. A rough lower bound, never a measurement. None without
    ``macs``/``params`` in the manifest.
    """
    macs, params = manifest.get("macs"), manifest.get("params")
    if not isinstance(macs, (int, float)) or not isinstance(params, (int, float)):
        return None
    return (batch * macs * (MULT_PJ + ADD_PJ) + params * DRAM_PJ_PER_32BIT) * 1e-9




TIME_ESTIMATE_BASIS = ("time-based estimate, not a measurement: busy time per run (the timed "
                       "runs' median wall time) x the device's stated power (power.active_w - "
                       "power.idle_w in the fleet file)")


def time_estimate(power, busy_ms):
    """The time-based energy estimate of a measure response: the device's stated power
    (``power``: {"active_w", "idle_w"} or None) times the busy time of one run (``busy_ms``:
    the median wall time of the timed runs; the device runs the model for the whole of a run.
    Energy adds up over runs, which argues for the mean, but the mean also counts time in which
    other work preempted the runs; on a dedicated device the two differ little). W x ms = mJ.
    Without a stated power there is no estimate, and the basis says so."""
    if power is None or busy_ms is None:
        return {"time_estimated_energy_per_inference_mj": None, "stated_power_w": None,
                "time_estimate_basis": "no time-based estimate: the fleet file states no power "
                "for this device (power: {active_w: W})"}
    watts = power["active_w"] - power["idle_w"]
    return {"time_estimated_energy_per_inference_mj": finite(watts * busy_ms),
            "stated_power_w": finite(watts), "time_estimate_basis": TIME_ESTIMATE_BASIS}


# ---------------------------------------------------------------------------- the response


def energy_result(spec, source, note, idle, sampler, window, runs, estimate_mj):
    """The ``energy`` object of a measure response.

    ``kind``: "measured" (a real sensor), "simulated" (a sensor that is a model: labelled so by
    the request or by the sensor itself) or "estimated" (no usable sensor reading: measured
    energy is null and only the operation-count estimate is given).
    """
    sim_label = spec["simulated"]
    out = {
        "source": source.source if source else None,
        "sensor": source.describe() if source else None,
        "kind": "estimated",
        "simulated": False,
        "simulated_note": None,
        "energy_per_inference_mj": None,
        "net_energy_j": None,
        "samples": 0,
        "sample_hz": spec["sample_hz"],
        "sample_hz_achieved": None,
        "window_s": None,
        "idle_power_w": None,
        "idle_samples": 0,
        "idle_s": spec["idle_s"],
        "active_power_w": None,
        "estimated_energy_per_inference_mj": finite(estimate_mj),
        "estimate_basis": ESTIMATE_BASIS if estimate_mj is not None else
        "no estimate: manifest.json lacks macs or params",
        "error": None,
        "note": note,
    }
    if source is None:
        return out
    if sim_label or source.sim_hint:
        out["simulated"] = True
        out["simulated_note"] = sim_label if isinstance(sim_label, str) else source.sim_hint or "simulated"
    idle_w, idle_n, idle_err = idle
    out["idle_power_w"] = finite(idle_w, 6)
    out["idle_samples"] = idle_n
    samples = sampler.samples
    out["samples"] = len(samples)
    if len(samples) > 1 and samples[-1][0] > samples[0][0]:
        out["sample_hz_achieved"] = finite((len(samples) - 1) / (samples[-1][0] - samples[0][0]), 3)
    # The timed runs' window, shifted by the sensor's lag (see EnergySource.lag_s).
    joules, span = integrate(samples, source.kind, window[0] + source.lag_s, window[1] + source.lag_s)
    if span > 0:
        out["window_s"] = finite(span, 6)
    if span < 0.5 * (window[1] - window[0]):
        joules = None  # the samples do not cover the runs: no number rather than a wrong one
    error = sampler.error or idle_err
    if error is None and joules is None:
        error = "no samples during the timed runs"
    if error is not None:
        out["error"] = error
        return out
    if idle_w is None:  # idle_s = 0
        out["note"] = "idle_s = 0: gross energy (idle power not measured, not subtracted)"
    net = joules - (idle_w or 0.0) * span
    out["kind"] = "simulated" if out["simulated"] else "measured"
    out["net_energy_j"] = finite(net)
    out["active_power_w"] = finite(joules / span, 6)
    out["energy_per_inference_mj"] = finite(net / runs * 1e3)
    if net <= 0:
        out["note"] = ("active power did not exceed idle power: the run is below this sensor's "
                       "resolution; measure longer (min_seconds) or with a larger batch")
    return out

