"""Check a fleet: can each device be reached, and what does its agent find there?

:func:`check_devices` contacts every device in parallel the way a measurement would (connect,
deploy the agent if it changed, start it, ``hello``), so a device that passes can measure. It
returns one :class:`DeviceCheck` per device, reachable or not, in the order given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from deepfleet.errors import DeepfleetError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device

__all__ = ["DeviceCheck", "check_devices", "describe_energy", "describe_runtimes"]

MAX_PARALLEL_DEVICES = 32


@dataclass(frozen=True, kw_only=True)
class DeviceCheck:
    """One device's state: what its agent said, or why it could not be reached.

    ``energy`` says where energy readings would come from (or that there are none and only
    estimates will be given); ``simulated`` joins what is not real about the device and its
    sensor. ``runtimes`` lists the runtimes installed there with their versions (numpy always),
    ``auto`` the one ``backend: auto`` runs an artifact with model.onnx in (the first of the
    device's ``backends`` installed there). ``seconds`` is how long the check took (connect +
    deploy + hello).
    """

    device: str
    device_class: str
    reachable: bool
    arch: str | None = None
    python: str | None = None
    numpy: str | None = None
    agent_version: str | None = None
    energy: str | None = None
    runtimes: str | None = None
    auto: str | None = None
    simulated: str | None = None
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_energy(device: Device, hello: dict[str, Any]) -> str:
    """Where the agent will read energy on ``device``, from its fleet entry and ``hello``."""
    spec = device.energy
    if spec.source == "none":
        return "none (fleet file): estimates only"
    if spec.source == "command" and spec.command:
        return "command: " + " ".join(spec.command)
    found = hello.get("energy_sources") or []
    if spec.source != "auto":
        found = [s for s in found if s.get("source") == spec.source]
    if spec.path:
        # The fleet file pins a sensor: only what the agent found under that path counts.
        found = [s for s in found if str(s.get("path", "")).startswith(spec.path.rstrip("/"))]
    if not found:
        wanted = spec.source if spec.source != "auto" else "rapl, hwmon or power_supply"
        return f"none found ({wanted}{' at ' + spec.path if spec.path else ''}): estimates only"
    best = found[0]
    text = f"{best.get('source')}: {best.get('sensor') or best.get('path')}"
    return text + (" [says simulated]" if best.get("simulated") else "")


def describe_runtimes(device: Device, hello: dict[str, Any]) -> tuple[str, str]:
    """(installed runtimes with versions, in the device's order of preference first; what
    ``auto`` picks for an artifact that has every runtime's file) from ``hello``."""
    installed = list(hello.get("backends") or ["numpy"])
    versions = hello.get("backend_versions") or {}
    order = [b for b in device.backends if b in installed] + [b for b in installed if b not in device.backends]
    text = ", ".join(f"{b} {versions.get(b) or '?'}" for b in order)
    first = next((b for b in device.backends if b in installed), None)
    auto = first or f"none of {', '.join(device.backends)} (add numpy to backends)"
    if first is not None and first != device.backends[0]:
        auto += f" (no {device.backends[0]})"
    return text, auto


def _notes(device: Device, energy: str | None) -> str | None:
    notes = [device.simulated, device.energy.simulated]
    if energy and "[says simulated]" in energy and not device.energy.simulated:
        notes.append("energy sensor reports itself as simulated")
    return "; ".join(n for n in notes if n) or None


def _check_one(device: Device, factory: Callable[[Device], DeviceSession]) -> DeviceCheck:
    start = time.monotonic()
    try:
        with factory(device) as session:
            hello = session.connect()
    except DeepfleetError as exc:
        return DeviceCheck(device=device.name, device_class=device.device_class,
                           reachable=False, simulated=_notes(device, None), error=str(exc),
                           seconds=round(time.monotonic() - start, 3))
    except Exception as exc:  # a bug must not hide the other devices' answers
        return DeviceCheck(device=device.name, device_class=device.device_class,
                           reachable=False, error=f"device {device.name!r}: internal error in "
                           f"the driver: {type(exc).__name__}: {exc}",
                           seconds=round(time.monotonic() - start, 3))
    energy = describe_energy(device, hello)
    runtimes, auto = describe_runtimes(device, hello)
    return DeviceCheck(device=device.name, device_class=device.device_class, reachable=True,
                       arch=hello.get("machine"), python=hello.get("python"),
                       numpy=hello.get("numpy"), agent_version=hello.get("agent_version"),
                       energy=energy, runtimes=runtimes, auto=auto, simulated=_notes(device, energy),
                       seconds=round(time.monotonic() - start, 3))


def check_devices(devices: Sequence[Device], *,
                  session_factory: Callable[[Device], DeviceSession] = DeviceSession,
                  ) -> list[DeviceCheck]:
    """Check every device in parallel; return one DeviceCheck per device, in the given order.

    Never raises for a device's failure: an unreachable device (refused, timed out, unknown
    host key, wrong user or key, no numpy, ...) is a DeviceCheck with ``reachable=False`` and an
    ``error`` naming the device and the cause.
    """
    if not devices:
        return []
    with ThreadPoolExecutor(max_workers=min(len(devices), MAX_PARALLEL_DEVICES),
                            thread_name_prefix="check") as pool:
        return list(pool.map(lambda d: _check_one(d, session_factory), devices))
