"""The fleet file: which devices exist and how to reach them.

A ``fleet.yaml`` lists devices under ``devices:``; an optional ``defaults:`` mapping supplies keys
that every device inherits unless it sets them itself::

    defaults:
      user: root
      key: ~/.ssh/id_ed25519
      known_hosts: ./known_hosts
    devices:
      - name: edison-1
        host: 10.0.0.17
        class: edison
        energy: {source: hwmon, path: /sys/class/hwmon/hwmon0, sample_hz: 50}
        backends: [numpy]              # only numpy on an Edison (i686)
        power: {active_w: 1.0, idle_w: 0.35}
        tags: [lab-a]

``backends`` is the device's runtime preference, in order: a measurement with ``backend: auto``
(the default) runs in the first of them that is installed on the device and that the artifact
has a file for (default ``[onnxruntime, numpy]``: ONNX Runtime where it is installed, as on ARM64
and x86 boards, numpy elsewhere). ``power`` is the device's stated power while it runs a model
(``active_w``; ``idle_w`` optional, subtracted when given), from a datasheet or a one-time meter
reading: it turns measured busy time into the time-based energy estimate. Without it there is
no such estimate.

``energy.simulated`` (true, or a note) marks a sensor that is a model rather than a meter, such
as the sandbox's simulated hwmon device: every row measured with it has ``energy_kind``
``simulated`` and carries the note. ``simulated`` on the device itself says what else is not
real (an emulated CPU, a shaped link).

``sensors`` gives the power each sensor of the device draws while it samples, in milliwatts,
from its datasheet (a device's own entries win over those in ``defaults``, sensor by sensor)::

    defaults:
      sensors: {accelerometer: {mw: 0.2}, gyroscope: {mw: 6.0}}

Sensor names are the data's (its ``sensors`` array). The sensing energy of an inference, kept
sensors' power times the data's window, is an estimate from these figures
(:mod:`deepfleet.sensing`), never a measurement.

Everything is validated on load: an unknown key, a wrong type, a duplicate name, a bad port or a
missing key file raises :class:`~deepfleet.errors.ConfigError` naming the file, the device, the
key, the bad value and what is accepted. Relative paths are relative to the fleet file.

Without a fleet file, :func:`local_fleet` gives the built-in ``local`` device, which runs on this
machine without SSH.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepfleet.device_agent.protocol import BACKENDS, DEFAULT_PREFERENCE
from deepfleet.errors import ConfigError

__all__ = [
    "ENERGY_SOURCES",
    "LOCAL_DEVICE",
    "Device",
    "EnergySpec",
    "Fleet",
    "PowerSpec",
    "SensorPower",
    "load_fleet",
    "local_fleet",
]

ENERGY_SOURCES = ("auto", "rapl", "hwmon", "power_supply", "command", "none")

# A device name becomes part of file and partition paths, so it is restricted to a safe alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# OpenSSH's default fingerprint form: "SHA256:" + unpadded base64 of 32 bytes (43 characters).
_FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


@dataclass(frozen=True, kw_only=True)
class EnergySpec:
    """Where a device's energy readings come from.

    ``source`` is one of :data:`ENERGY_SOURCES`; ``path`` optionally pins the sensor (a powercap,
    hwmon or power_supply directory on the device); ``command`` is the argv of an external meter
    (required for, and only allowed with, ``source: command``); ``sample_hz`` is the sampling rate.
    ``simulated`` is a note when the sensor is a model, not a meter (the agent then labels its
    energy ``simulated``); None for a real sensor.
    """

    source: str = "auto"
    path: str | None = None
    command: tuple[str, ...] | None = None
    sample_hz: float = 10.0
    simulated: str | None = None


@dataclass(frozen=True, kw_only=True)
class PowerSpec:
    """A device's stated power while it runs a model (``active_w``) and at rest (``idle_w``, 0:
    not stated), in watts: the basis of the time-based energy estimate, never a measurement."""

    active_w: float
    idle_w: float = 0.0

    def request(self) -> dict[str, float]:
        """The agent's ``power`` request field."""
        return {"active_w": self.active_w, "idle_w": self.idle_w}


@dataclass(frozen=True)
class SensorPower:
    """A sensor of a device and the power it draws while sampling (mW, from a datasheet)."""

    name: str
    mw: float


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device of the fleet (plain data: safe to pickle to Ray workers).

    ``host is None`` marks the built-in local device (no SSH). For SSH devices exactly one of
    ``host_key`` (an OpenSSH ``SHA256:`` fingerprint) and ``known_hosts`` (a file) says which host
    key to trust. ``simulated`` is a human-readable note when some part of the device is not real
    (an emulated CPU, a simulated power sensor); measurement rows copy it. ``backends`` is the
    runtime preference that ``backend: auto`` walks; ``power`` the stated power (or None).
    """

    name: str
    device_class: str
    host: str | None = None
    port: int = 22
    user: str | None = None
    key: Path | None = None
    host_key: str | None = None
    known_hosts: Path | None = None
    python: str = "python3"
    workdir: str = "~/.deepfleet"
    energy: EnergySpec = field(default_factory=EnergySpec)
    backends: tuple[str, ...] = DEFAULT_PREFERENCE
    power: PowerSpec | None = None
    tags: tuple[str, ...] = ()
    simulated: str | None = None
    sensors: tuple[SensorPower, ...] = ()

    @property
    def is_local(self) -> bool:
        """True for the built-in device that runs on this machine without SSH."""
        return self.host is None

    @property
    def sensor_mw(self) -> dict[str, float]:
        """{sensor name: power in mW} from the fleet file (empty when it gives none)."""
        return {s.name: s.mw for s in self.sensors}


@dataclass(frozen=True, kw_only=True)
class Fleet:
    """The devices of one fleet file (``path is None`` for the built-in local fleet)."""

    devices: tuple[Device, ...]
    path: Path | None = None

    def __getitem__(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        raise ConfigError(
            f"{self.path or 'built-in fleet'}: no device named {name!r}; "
            f"known devices: {', '.join(self.names) or '(none)'}"
        )

    def __iter__(self) -> Iterator[Device]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def of_class(self, device_class: str) -> tuple[Device, ...]:
        """The devices whose ``class`` is ``device_class`` (possibly none)."""
        return tuple(d for d in self.devices if d.device_class == device_class)


#: The built-in device: this machine, the running interpreter (it has numpy), no SSH.
LOCAL_DEVICE = Device(
    name="local",
    # Its own class: this machine also runs the driver and the training, so its timings must not
    # pool with a fleet's devices; each row still records the architecture.
    device_class="local",
    python=sys.executable,
    energy=EnergySpec(source="auto"),
    tags=("local",),
)


def local_fleet() -> Fleet:
    """The fleet used when no fleet file is given: just :data:`LOCAL_DEVICE`."""
    return Fleet(devices=(LOCAL_DEVICE,))


# ---------------------------------------------------------------------------------------------
# Loading and validation


_DEVICE_KEYS = ("name", "host", "port", "user", "key", "host_key", "known_hosts", "class",
                "python", "workdir", "energy", "backends", "power", "tags", "simulated", "sensors")
_ENERGY_KEYS = ("source", "path", "command", "sample_hz", "simulated")


class _Where:
    """Builds error messages that name the file, the device and the key."""

    def __init__(self, path: Path, device: str | None = None) -> None:
        self.path = path
        self.device = device

    def error(self, key: str, value: object, accepted: str) -> ConfigError:
        where = f"{self.path}: device {self.device!r}" if self.device else f"{self.path}"
        shown = f"{value!r} ({type(value).__name__})" if value is not None else "nothing"
        return ConfigError(f"{where}: key {key!r}: got {shown}; accepted: {accepted}")


def _str(where: _Where, key: str, value: object, *, pattern: re.Pattern[str] | None = None,
         accepted: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.error(key, value, accepted)
    if pattern is not None and not pattern.match(value):
        raise where.error(key, value, accepted)
    return value


def _file(where: _Where, key: str, value: object, base: Path) -> Path:
    text = _str(where, key, value, accepted="a path to an existing file")
    path = Path(text).expanduser()
    path = path if path.is_absolute() else (base / path)
    if not path.is_file():
        raise where.error(key, value, f"a path to an existing file ({path} does not exist)")
    return path


def _port(where: _Where, value: object) -> int:
    # bool is an int subclass: `port: yes` must not become port 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise where.error("port", value, "an integer from 1 to 65535")
    return value


def _energy(where: _Where, value: object) -> EnergySpec:
    if value is None:
        return EnergySpec()
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, Mapping):
        raise where.error("energy", value, f"a mapping with keys {', '.join(_ENERGY_KEYS)}")
    for key in value:
        if key not in _ENERGY_KEYS:
            raise where.error(f"energy.{key}", value[key],
                              f"only the keys {', '.join(_ENERGY_KEYS)}")
    source = value.get("source", "auto")
    if source not in ENERGY_SOURCES:
        raise where.error("energy.source", source, f"one of {', '.join(ENERGY_SOURCES)}")
    path = value.get("path")
    if path is not None:
        path = _str(where, "energy.path", path, accepted="a path on the device")
    command: tuple[str, ...] | None = None
    raw = value.get("command")
    if raw is not None:
        if isinstance(raw, str) and raw.strip():
            command = tuple(shlex.split(raw))
        elif isinstance(raw, list) and raw and all(isinstance(a, str) for a in raw):
            command = tuple(raw)
        else:
            raise where.error("energy.command", raw, "a command line string or a list of strings")
    if (source == "command") != (command is not None):
        raise where.error("energy.command", raw,
                          "a meter command exactly when energy.source is 'command'")
    hz = value.get("sample_hz", 10.0)
    if isinstance(hz, bool) or not isinstance(hz, int | float) or not 0 < hz <= 10_000:
        raise where.error("energy.sample_hz", hz, "a number of samples per second in (0, 10000]")
    simulated = _note(where, "energy.simulated", value.get("simulated"), "simulated sensor")
    if simulated is not None and source == "none":
        raise where.error("energy.simulated", value.get("simulated"),
                          "no simulated note when energy.source is 'none' (nothing is read)")
    return EnergySpec(source=source, path=path, command=command, sample_hz=float(hz),
                      simulated=simulated)


def _backends(where: _Where, value: object) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_PREFERENCE
    accepted = (f"a non-empty list of distinct runtimes from {', '.join(BACKENDS)}, in order of "
                f"preference (default [{', '.join(DEFAULT_PREFERENCE)}])")
    if (not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value)
            or len(set(value)) != len(value)):
        raise where.error("backends", value, accepted)
    unknown = [v for v in value if v not in BACKENDS]
    if unknown:
        raise where.error("backends", value, f"{accepted}; {', '.join(map(repr, unknown))} is not one")
    return tuple(value)


def _watts(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value < 1e6


def _power(where: _Where, value: object) -> PowerSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise where.error("power", value, "a mapping {active_w: W, idle_w: W (optional)}")
    for key in value:
        if key not in ("active_w", "idle_w"):
            raise where.error(f"power.{key}", value[key], "only the keys active_w, idle_w")
    active = value.get("active_w")
    if not _watts(active) or active == 0:
        raise where.error("power.active_w", active, "watts > 0: the device's power while it runs "
                          "a model (a datasheet figure or a meter reading)")
    idle = value.get("idle_w", 0.0)
    if not _watts(idle) or idle >= active:
        raise where.error("power.idle_w", idle, f"watts >= 0 and below active_w ({active})")
    return PowerSpec(active_w=float(active), idle_w=float(idle))


def _sensors(where: _Where, value: object) -> tuple[SensorPower, ...]:
    """``sensors: {name: {mw: number}}``: each sensor's sampling power in milliwatts."""
    if value is None:
        return ()
    example = "a mapping of sensor names to {mw: power in milliwatts}, e.g. {gyroscope: {mw: 6.0}}"
    if not isinstance(value, Mapping):
        raise where.error("sensors", value, example)
    out = []
    for name, spec in value.items():
        key = f"sensors.{name}"
        if not isinstance(name, str) or not name.strip():
            raise where.error("sensors", name, "sensor names that are non-empty strings (the data's names)")
        if not isinstance(spec, Mapping) or set(spec) != {"mw"}:
            raise where.error(key, spec, "{mw: power in milliwatts while sampling}")
        mw = spec["mw"]
        if not _watts(mw):
            raise where.error(f"{key}.mw", mw, "a power in milliwatts, a number >= 0")
        out.append(SensorPower(name=name, mw=float(mw)))
    return tuple(out)


def _note(where: _Where, key: str, value: object, default: str) -> str | None:
    """A ``simulated`` value: true gives ``default``, false or nothing gives None."""
    if value is True:
        return default
    if value is False or value is None:
        return None
    return _str(where, key, value, accepted="true/false or a note saying what is simulated")


def _device(where: _Where, raw: Mapping[str, Any], base: Path) -> Device:
    for key in raw:
        if key not in _DEVICE_KEYS:
            raise where.error(str(key), raw[key], f"only the keys {', '.join(_DEVICE_KEYS)}")
    for key in ("host", "user", "key", "class"):
        if raw.get(key) is None:
            raise where.error(key, None, f"a value for {key!r} (it is required)")
    host = _str(where, "host", raw["host"], accepted="a host name or address")
    user = _str(where, "user", raw["user"], accepted="a user name on the device")
    device_class = _str(where, "class", raw["class"], pattern=_NAME_RE,
                        accepted="a device class name such as x86, edison or arm64")
    key_path = _file(where, "key", raw["key"], base)
    host_key = raw.get("host_key")
    known_hosts = raw.get("known_hosts")
    if (host_key is None) == (known_hosts is None):
        raise where.error("host_key/known_hosts", {"host_key": host_key, "known_hosts": known_hosts},
                          "exactly one of host_key (an OpenSSH SHA256: fingerprint) or known_hosts "
                          "(a file), so that the device's host key can be verified")
    if host_key is not None:
        host_key = _str(where, "host_key", host_key, pattern=_FINGERPRINT_RE,
                        accepted="an OpenSSH fingerprint 'SHA256:<43 base64 characters>' "
                                 "(ssh-keygen -lf <host key>.pub prints it)")
    known_hosts_path = _file(where, "known_hosts", known_hosts, base) if known_hosts else None
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise where.error("tags", tags, "a list of non-empty strings")
    simulated = _note(where, "simulated", raw.get("simulated"), "simulated")
    return Device(
        name=where.device or "",
        device_class=device_class,
        host=host,
        port=_port(where, raw.get("port", 22)),
        user=user,
        key=key_path,
        host_key=host_key,
        known_hosts=known_hosts_path,
        python=_str(where, "python", raw.get("python", "python3"),
                    accepted="the interpreter's name or path on the device"),
        workdir=_str(where, "workdir", raw.get("workdir", "~/.deepfleet"),
                     accepted="a directory on the device"),
        energy=_energy(where, raw.get("energy")),
        backends=_backends(where, raw.get("backends")),
        power=_power(where, raw.get("power")),
        tags=tuple(tags),
        simulated=simulated,
        sensors=_sensors(where, raw.get("sensors")),
    )


def load_fleet(path: str | Path) -> Fleet:
    """Load and validate a fleet file.

    Returns a :class:`Fleet` with at least one device. Raises :class:`ConfigError` for an
    unreadable file, invalid YAML, or any invalid entry (the message names the file, the device,
    the key, the bad value and what is accepted).
    """
    path = Path(path).expanduser().resolve()
    top = _Where(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the fleet file: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        # PyYAML's message spans several lines; an error is one line (the CLI prints it as such).
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML{where}: {what}") from exc
    if not isinstance(data, Mapping):
        raise top.error("(top level)", data, "a mapping with 'devices' and optional 'defaults'")
    for key in data:
        if key not in ("devices", "defaults"):
            raise top.error(str(key), data[key], "only the top-level keys 'devices' and 'defaults'")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping) or "name" in defaults:
        raise top.error("defaults", defaults, "a mapping of device keys other than 'name'")
    entries = data.get("devices")
    if not isinstance(entries, list) or not entries:
        raise top.error("devices", entries, "a non-empty list of device mappings")
    devices: list[Device] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise top.error(f"devices[{index}]", entry, "a mapping of device keys")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise top.error(f"devices[{index}].name", name,
                            "a name of letters, digits, '.', '_' or '-' (at most 63 characters)")
        if name in (d.name for d in devices):
            raise top.error(f"devices[{index}].name", name, "a name not used by another device")
        merged = {**defaults, **entry}
        if isinstance(defaults.get("sensors"), Mapping) and isinstance(entry.get("sensors"), Mapping):
            merged["sensors"] = {**defaults["sensors"], **entry["sensors"]}  # sensor by sensor
        devices.append(_device(_Where(path, name), merged, path.parent))
    return Fleet(devices=tuple(devices), path=path)
