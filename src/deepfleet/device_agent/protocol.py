"""The device protocol's request schema: what a request may hold, validated, with its defaults.

A library (Python >= 3.8, standard library only; this module may import nothing else) shared
by the device program, which answers requests, and host code, which checks settings before any
device is contacted (``orchestrator/measure.py``). It is inlined into the one file shipped to
devices (see ``bundle.py``). Every ``parse_*`` function returns plain dicts with the defaults
filled in, or raises :class:`AgentError` (kind ``bad_request``) naming the field, the bad value
and what is accepted.
"""

import math
import re
import shlex

# ============================================================================ protocol
#
# ``python3 agent.py serve``: one JSON object per line on stdin, one JSON object per line on
# stdout (flushed after each), diagnostics on stderr only. Anything else that writes to stdout
# (a stray print, a C library) is sent to stderr, so the protocol stream cannot be corrupted.
# End of stdin ends the agent (exit 0), as does ``bye``.
#
# Every response has "ok", "op" (the request's op), "agent_ms" (time spent inside the agent)
# and, when the request had one, "id" (echoed so that a client can match answers). A failure is
# {"ok": false, "error": "<what and how to fix it>", "kind": "<kind>"} and the loop keeps serving.
# Kinds: bad_request (malformed JSON, unknown op or field, bad value), artifact_missing,
# artifact_corrupt (hash mismatch, unreadable or unknown format), backend_unavailable,
# energy_unavailable (an explicitly named sensor is not there), internal (a bug: traceback on
# stderr).
#
# Requests (defaults in brackets):
#   {"op": "hello"[, "energy": ENERGY]}  ->  agent_version, agent_sha256 (of the file that
#       runs), protocol, pid, python, numpy, machine, system, release, hostname, cpu_model,
#       cpu_count, affinity, governor, freq_mhz, freq_source, thermal_zones [{zone, type,
#       temp_c}], energy_sources [{source, path, sensor, kind, simulated}], energy_notes,
#       backends (names whose runtime is installed; only numpy is imported), backend_versions,
#       blas {library, vendor, threads, settable}, ops.
#   {"op": "ping"}  ->  {"ok": true}: the cheapest round trip (per-request overhead).
#   {"op": "measure", "artifact": DIR (required, already on the device),
#       "warmup" [5], "min_runs" [10], "max_runs" [10000], "min_seconds" [1.0],
#       "max_seconds" [30.0], "batch" [1], "threads" [null = leave as found], "backend"
#       ["auto" | "numpy" | "onnxruntime" | "torch" | "litert"], "backends" [["onnxruntime", "numpy"]: the
#       device's preference, which "auto" walks: the first one installed here whose file the
#       artifact has], "fresh" [true: load the model afresh, timed, ignoring a cached instance;
#       false: use a cached instance when there is one], "ci_target" [0.02, null = stop at the
#       minimum], "ci_level" [0.95], "seed" [0], "cpus" [null = inherited affinity],
#       "disable_gc" [true], "verify" [true], "thermal": {"path", "settle_max_s" [30],
#       "window_s" [2], "tolerance_c" [0.5]}, "energy": ENERGY, "power": POWER [null]}
#     ENERGY = {"source" ["auto" | "rapl" | "hwmon" | "power_supply" | "command" | "none"],
#       "path" [null = /sys/class/<kind>; a class dir or one sensor dir], "channel" [null = first
#       power channel, e.g. "power1" or "curr2"], "command" [null; argv list or string],
#       "unit" ["W" | "J"] (what the command prints), "sample_hz" [10], "idle_s" [0.5],
#       "simulated" [null; true or a note: the sensor is a model, not a meter]}
#     POWER = {"active_w" (required: the device's stated power while it runs a model, W),
#       "idle_w" [0: the estimate is gross]}: the basis of the time-based energy estimate
#       (busy time per run x (active_w - idle_w)); null: no time-based estimate.
#     -> see ``measure()`` for the response fields.
#     Worst-case duration: settle_max_s + idle_s + warm-up + max_seconds + one run: clients
#     should set their reply deadline from that.
#   {"op": "infer", "artifact": DIR, "input": nested list (B, *input_shape) [null: the
#       measure input from "batch" [1] and "seed" [0]], "backend" ["numpy"], "verify" [true]}
#       ->  outputs (nested lists), shapes, artifact_hash.
#   {"op": "bye"}  ->  {"ok": true}, then exit 0.
#
# External meter command contract (energy source "command"): the agent runs the argv once per
# sample (no shell) and takes the FIRST number printed on stdout: instantaneous power in watts
# with "unit": "W", or a cumulative energy counter in joules with "unit": "J" (the agent takes
# differences). A non-zero exit status or no number is a sensor error. Spawning costs the device
# a few ms of CPU per sample: keep sample_hz low (<= 10) with a command meter.

PROTOCOL_VERSION = 1
BACKENDS = ("numpy", "onnxruntime", "torch", "litert")

# The operation-count energy estimate every measure response carries (DESIGN §6: the seed's energy
# table, 32-bit float operations at 45 nm as used by the DeepIoT paper, in pJ):
# part of what a response means, so the host (reports) reads the same definition.
MULT_PJ = 3.7
ADD_PJ = 0.9
DRAM_PJ_PER_32BIT = 640.0
ESTIMATE_BASIS = ("operation-count estimate, not a measurement: batch x MACs x (3.7 + 0.9) pJ + "
                  "params x 640 pJ (32-bit float MULT, ADD, DRAM access; activations not counted)")
# "auto" is not a runtime: it picks one from the request's "backends" (the device's preference).
BACKEND_CHOICES = ("auto",) + BACKENDS
DEFAULT_PREFERENCE = ("onnxruntime", "numpy")
ENERGY_SOURCES = ("auto", "rapl", "hwmon", "power_supply", "command", "none")


class AgentError(Exception):
    """A request that cannot be served; ``kind`` is reported next to the message."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind

    def __reduce__(self):  # picklable (Ray re-raises a worker's error in the driver)
        return (type(self), (self.kind, str(self)))


def finite(x, digits=None):
    """A JSON-safe float: None for NaN/inf/None (strict JSON has no NaN), optionally rounded."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return round(x, digits) if digits is not None else x


# ---------------------------------------------------------------------------- request fields

_REQUIRED = object()
_NUMBER = (int, float)


def _field(req, key, kinds, default, accepted, check=None, nullable=False, where=""):
    """``req[key]`` (or ``default``) if it is an instance of ``kinds`` passing ``check``.

    A bool is never taken for a number. Raises AgentError(bad_request) naming the field, the bad
    value and what is accepted.
    """
    value = req.get(key, default)
    if value is _REQUIRED:
        raise AgentError("bad_request", "%s%r is required: give %s" % (where, key, accepted))
    if value is None and nullable:
        return None
    good = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if good and check is not None:
        good = check(value)
    if not good:
        raise AgentError("bad_request", "%s%r must be %s, but got %r" % (where, key, accepted, value))
    return value


def _no_unknown(req, known, where):
    unknown = sorted(set(req) - set(known))
    if unknown:
        raise AgentError("bad_request", "%sunknown field(s) %s; accepted: %s"
                         % (where, ", ".join(map(repr, unknown)), ", ".join(sorted(known))))


ENERGY_KEYS = ("source", "path", "channel", "command", "unit", "sample_hz", "idle_s", "simulated")
THERMAL_KEYS = ("path", "settle_max_s", "window_s", "tolerance_c")
MEASURE_KEYS = ("op", "id", "artifact", "warmup", "min_runs", "max_runs", "min_seconds",
                "max_seconds", "batch", "threads", "backend", "ci_target", "ci_level", "seed",
                "cpus", "disable_gc", "verify", "thermal", "energy", "backends", "fresh", "power")
POWER_KEYS = ("active_w", "idle_w")


def _section(raw, keys, name):
    """A request's ``name`` object (None: empty), checked to be an object of known ``keys``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise AgentError("bad_request", "'%s' must be an object with keys %s, but got %r"
                         % (name, ", ".join(keys), raw))
    _no_unknown(raw, keys, name + ": ")
    return raw


def parse_energy(raw):
    """The ``energy`` settings of a request, validated, with defaults filled in."""
    raw = _section(raw, ENERGY_KEYS, "energy")
    w = "energy."
    spec = {
        "source": _field(raw, "source", (str,), "auto", "one of " + ", ".join(ENERGY_SOURCES),
                         lambda v: v in ENERGY_SOURCES, where=w),
        "path": _field(raw, "path", (str,), None, "a directory on the device", nullable=True, where=w),
        "channel": _field(raw, "channel", (str,), None, "a channel such as 'power1' or 'curr2'",
                          lambda v: re.match(r"^(power|curr)\d+$", v) is not None, nullable=True, where=w),
        "unit": _field(raw, "unit", (str,), "W", "'W' (watts per reading) or 'J' (cumulative joules)",
                       lambda v: v in ("W", "J"), where=w),
        "sample_hz": _field(raw, "sample_hz", _NUMBER, 10.0, "a rate in (0, 1000] samples per second",
                            lambda v: 0 < v <= 1000, where=w),
        "idle_s": _field(raw, "idle_s", _NUMBER, 0.5, "seconds of idle power measurement in [0, 60]",
                         lambda v: 0 <= v <= 60, where=w),
        "simulated": _field(raw, "simulated", (str, bool), None, "true or a note saying what is simulated",
                            nullable=True, where=w),
    }
    command = raw.get("command")
    if isinstance(command, str):
        command = shlex.split(command)
    if command is not None and not (isinstance(command, list) and command
                                    and all(isinstance(c, str) for c in command)):
        raise AgentError("bad_request", "energy.'command' must be a command line string or a "
                         "non-empty list of strings, but got %r" % (raw.get("command"),))
    if spec["source"] == "command" and not command:
        raise AgentError("bad_request", "energy source 'command' needs energy.'command': the meter "
                         "program to run per sample")
    spec["command"] = command
    if spec["simulated"] is False:
        spec["simulated"] = None
    return spec


def parse_thermal(raw):
    """The ``thermal`` settings of a request, validated, with defaults filled in."""
    raw = _section(raw, THERMAL_KEYS, "thermal")
    w = "thermal."
    return {
        "path": _field(raw, "path", (str,), None, "a directory on the device", nullable=True, where=w),
        "settle_max_s": _field(raw, "settle_max_s", _NUMBER, 30.0, "seconds in [0, 600]",
                               lambda v: 0 <= v <= 600, where=w),
        "window_s": _field(raw, "window_s", _NUMBER, 2.0, "seconds in (0, 60]",
                           lambda v: 0 < v <= 60, where=w),
        "tolerance_c": _field(raw, "tolerance_c", _NUMBER, 0.5, "degrees Celsius > 0",
                              lambda v: v > 0, where=w),
    }


def parse_backends(raw):
    """The device's backend preference (what "auto" walks): a non-empty list of distinct
    runtimes, in order; the default when null."""
    if raw is None:
        return list(DEFAULT_PREFERENCE)
    if (not isinstance(raw, list) or not raw or len(set(map(str, raw))) != len(raw)
            or not all(isinstance(v, str) and v in BACKENDS for v in raw)):
        raise AgentError("bad_request", "'backends' must be a non-empty list of distinct runtimes "
                         "from %s, in order of preference, but got %r" % (", ".join(BACKENDS), raw))
    return list(raw)


def parse_power(raw):
    """The device's stated power (``power``), validated, or None when not given."""
    if raw is None:
        return None
    raw = _section(raw, POWER_KEYS, "power")
    w = "power."
    active = _field(raw, "active_w", _NUMBER, _REQUIRED, "watts > 0 (the device's power while it "
                    "runs a model)", lambda v: 0 < v < 1e6, where=w)
    idle = _field(raw, "idle_w", _NUMBER, 0.0, "watts >= 0 and below active_w",
                  lambda v: 0 <= v < active, where=w)
    return {"active_w": float(active), "idle_w": float(idle)}


def parse_measure(req):
    """A measure request, validated, with defaults filled in (see the protocol comment)."""
    _no_unknown(req, MEASURE_KEYS, "measure: ")
    positive = lambda v: v >= 1  # noqa: E731
    spec = {
        "artifact": _field(req, "artifact", (str,), _REQUIRED, "the artifact directory on the device"),
        "warmup": _field(req, "warmup", (int,), 5, "an integer >= 0", lambda v: v >= 0),
        "min_runs": _field(req, "min_runs", (int,), 10, "an integer >= 1", positive),
        "max_runs": _field(req, "max_runs", (int,), 10000, "an integer >= 1", positive),
        "min_seconds": _field(req, "min_seconds", _NUMBER, 1.0, "seconds >= 0", lambda v: v >= 0),
        "max_seconds": _field(req, "max_seconds", _NUMBER, 30.0, "seconds > 0", lambda v: v > 0),
        "batch": _field(req, "batch", (int,), 1, "an integer >= 1", positive),
        "threads": _field(req, "threads", (int,), None, "an integer >= 1 or null", positive, nullable=True),
        "backend": _field(req, "backend", (str,), "auto", "one of " + ", ".join(BACKEND_CHOICES),
                          lambda v: v in BACKEND_CHOICES),
        "backends": parse_backends(req.get("backends")),
        "fresh": _field(req, "fresh", (bool,), True, "true or false"),
        "power": parse_power(req.get("power")),
        "ci_target": _field(req, "ci_target", _NUMBER, 0.02,
                            "a relative width (high - low) / p50 in (0, 10], or null",
                            lambda v: 0 < v <= 10, nullable=True),
        "ci_level": _field(req, "ci_level", _NUMBER, 0.95, "a confidence level in (0.5, 1)",
                           lambda v: 0.5 < v < 1),
        "seed": _field(req, "seed", (int,), 0, "an integer >= 0", lambda v: v >= 0),
        "cpus": _field(req, "cpus", (list,), None, "a non-empty list of CPU numbers or null",
                       lambda v: bool(v) and all(isinstance(c, int) and not isinstance(c, bool)
                                                 and c >= 0 for c in v), nullable=True),
        "disable_gc": _field(req, "disable_gc", (bool,), True, "true or false"),
        "verify": _field(req, "verify", (bool,), True, "true or false"),
        "thermal": parse_thermal(req.get("thermal")),
        "energy": parse_energy(req.get("energy")),
    }
    if spec["max_runs"] < spec["min_runs"]:
        raise AgentError("bad_request", "'min_runs' <= 'max_runs' must hold, but got (min_runs=%d, "
                         "max_runs=%d)" % (spec["min_runs"], spec["max_runs"]))
    if spec["max_seconds"] < spec["min_seconds"]:
        raise AgentError("bad_request", "'min_seconds' <= 'max_seconds' must hold, but got "
                         "(min_seconds=%g, max_seconds=%g)" % (spec["min_seconds"], spec["max_seconds"]))
    return spec


INFER_KEYS = ("op", "id", "artifact", "input", "batch", "seed", "backend", "verify")


def parse_infer(req):
    """An infer request, validated, with defaults filled in; ``input`` is passed on unchecked
    (its shape is checked against the model's input once the model is loaded)."""
    _no_unknown(req, INFER_KEYS, "infer: ")
    return {
        "artifact": _field(req, "artifact", (str,), _REQUIRED, "the artifact directory on the device"),
        "backend": _field(req, "backend", (str,), "numpy", "one of " + ", ".join(BACKENDS),
                          lambda v: v in BACKENDS),
        "verify": _field(req, "verify", (bool,), True, "true or false"),
        "batch": _field(req, "batch", (int,), 1, "an integer >= 1", lambda v: v >= 1),
        "seed": _field(req, "seed", (int,), 0, "an integer >= 0", lambda v: v >= 0),
        "input": req.get("input"),
    }


def parse_hello(req):
    """A hello request: the extra directory to look for energy sensors in (``energy.path``),
    or None."""
    _no_unknown(req, ("op", "id", "energy"), "hello: ")
    if req.get("energy") is None:
        return None
    return parse_energy(req["energy"])["path"]
