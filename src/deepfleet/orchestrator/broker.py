"""The device broker: exclusive, fair leases on devices, with quarantine of failing ones.

``DeviceBroker`` is plain Python (tested directly); ``BrokerActor`` is the same object as an
async Ray actor, so every trial's measurement task, wherever it runs, asks the one broker.

* A device serves one measurement at a time (a lease is exclusive).
* Waiters for a class are served first come, first served.
* After ``quarantine_after`` consecutive failures a device is quarantined for ``cooldown_s``;
  when every device of a class is quarantined, waiting for it fails at once with the reasons.
* Busy time per device is accounted, for the utilisation figure (busy / wall).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from deepfleet.errors import DeviceError, one_line


@dataclass
class _Device:
    name: str
    device_class: str
    holder: str | None = None
    leased_at: float = 0.0
    busy_s: float = 0.0
    failures: int = 0  # consecutive
    quarantined_until: float = 0.0
    last_error: str = ""
    leases: int = 0


@dataclass
class _Waiter:
    holder: str
    future: asyncio.Future[str] = field(repr=False)
    exclude: frozenset[str] = frozenset()


class DeviceBroker:
    def __init__(self, devices: list[dict[str, str]], *, quarantine_after: int = 3, cooldown_s: float = 300.0):
        self.devices = {d["name"]: _Device(d["name"], d["device_class"]) for d in devices}
        self.quarantine_after = quarantine_after
        self.cooldown_s = cooldown_s
        self.waiting: dict[str, deque[_Waiter]] = {}
        self.started = time.monotonic()

    def _usable(self, cls: str) -> list[_Device]:
        now = time.monotonic()
        return [d for d in self.devices.values() if d.device_class == cls and d.quarantined_until <= now]

    def _grant(self, d: _Device, holder: str) -> str:
        d.holder, d.leased_at = holder, time.monotonic()
        d.leases += 1
        return d.name

    def _dispatch(self, cls: str) -> None:
        """Serve waiters in arrival order; one that excludes every free device keeps its place."""
        queue = self.waiting.get(cls)
        if not queue:
            return
        for w in list(queue):
            if w.future.done():  # timed out meanwhile
                queue.remove(w)
                continue
            free = [d for d in self._usable(cls) if d.holder is None and d.name not in w.exclude]
            if not free:
                continue
            queue.remove(w)
            # the least used free device: spreads work over a class fairly
            w.future.set_result(self._grant(min(free, key=lambda d: (d.leases, d.name)), w.holder))

    def _down_reason(self, cls: str) -> str | None:
        members = [d for d in self.devices.values() if d.device_class == cls]
        if not members:
            return f"no device of class {cls!r} in the fleet"
        if not self._usable(cls):
            details = "; ".join(f"{d.name}: {d.last_error or 'quarantined'}" for d in members)
            return f"all devices of class {cls!r} are down ({details})"
        return None

    async def acquire(self, device_class: str, holder: str, timeout_s: float = 3600.0,
                      exclude: tuple[str, ...] = ()) -> str:
        """Lease a device of ``device_class`` (first come, first served); return its name.

        ``exclude`` names devices this holder must not get (e.g. already measured on).
        Raises DeviceError when the class has no usable device or the wait times out.
        """
        reason = self._down_reason(device_class)
        if reason:
            raise DeviceError(reason)
        if not [d for d in self._usable(device_class) if d.name not in exclude]:
            raise DeviceError(f"no other usable device of class {device_class!r} (excluding {', '.join(exclude)})")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(device_class, deque()).append(_Waiter(holder, fut, frozenset(exclude)))
        self._dispatch(device_class)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise DeviceError(
                f"no device of class {device_class!r} became free within {timeout_s:g} s"
            ) from None

    def release(self, name: str, ok: bool, error: str = "") -> None:
        """End a lease; ``ok=False`` counts a failure (and may quarantine the device)."""
        d = self.devices[name]
        if d.holder is not None:
            d.busy_s += time.monotonic() - d.leased_at
        d.holder = None
        if ok:
            d.failures, d.last_error = 0, ""
        else:
            d.failures += 1
            d.last_error = error
            if d.failures >= self.quarantine_after:
                d.quarantined_until = time.monotonic() + self.cooldown_s
        self._dispatch(d.device_class)
        self._fail_hopeless_waiters(d.device_class)

    def _fail_hopeless_waiters(self, cls: str) -> None:
        reason = self._down_reason(cls)
        if reason:
            for w in self.waiting.pop(cls, deque()):
                if not w.future.done():
                    w.future.set_exception(DeviceError(reason))

    def status(self) -> dict[str, Any]:
        """Per device: class, holder, busy seconds, utilisation so far, failures, quarantine."""
        now = time.monotonic()
        wall = max(now - self.started, 1e-9)
        out = {}
        for d in self.devices.values():
            busy = d.busy_s + (now - d.leased_at if d.holder else 0.0)
            out[d.name] = {
                "class": d.device_class, "holder": d.holder, "busy_s": round(busy, 3),
                "utilisation": busy / wall, "leases": d.leases, "failures": d.failures,
                "quarantined": d.quarantined_until > now, "last_error": d.last_error,
                "waiting": len(self.waiting.get(d.device_class, ())),
            }
        return out

    def reset_clock(self) -> None:
        """Start utilisation accounting now (e.g. when the first measurement could begin)."""
        self.started = time.monotonic()
        for d in self.devices.values():
            d.busy_s = 0.0


BrokerActor = ray.remote(num_cpus=0)(DeviceBroker)


@ray.remote(num_cpus=0)
def measure_on_class(
    broker: Any, actors: dict[str, Any], job: dict[str, Any]
) -> dict[str, Any]:
    """Measure ``job['artifact']`` on ``job['devices']`` distinct devices of ``job['device_class']``.

    Each device is leased from ``broker``; a device that fails is released as failed (its
    failure row is already written) and the measurement is re-queued on another device of the
    class, up to ``job['attempts']`` failures. Returns ``{"rows": [...], "errors": [...]}``;
    ``errors`` is non-empty when fewer devices than asked could measure.
    """
    cls, want = job["device_class"], int(job.get("devices", 1))
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    used: list[str] = []
    while len(used) < want and len(errors) < int(job.get("attempts", 3)):
        try:
            name = ray.get(broker.acquire.remote(cls, job["holder"], job.get("lease_timeout_s", 3600.0), tuple(used)))
        except DeviceError as exc:  # Ray's wrapper: its str() is the actor's traceback
            errors.append(one_line(exc))
            break
        try:
            rows += ray.get(actors[name].measure.remote(job["artifact"], job.get("trial")))
            used.append(name)
            ray.get(broker.release.remote(name, True))
        except Exception as exc:  # whatever breaks on one device (link, key, agent) fails only it
            reason = one_line(exc)
            errors.append(reason)
            ray.get(broker.release.remote(name, False, reason[:300]))
    return {"rows": rows, "errors": errors if len(used) < want else [], "devices": used}

