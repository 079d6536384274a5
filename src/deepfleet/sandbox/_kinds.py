"""The kinds of sandbox device (what ``--devices`` accepts): plain data, no side effects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from deepfleet.errors import ConfigError

__all__ = ["DEFAULT_KINDS", "KINDS", "Kind", "Link", "Power", "name_devices"]


@dataclass(frozen=True, kw_only=True)
class Link:
    """A shaped link: bandwidth in both directions and random loss towards the device."""

    rate_kbit: int
    loss_percent: float


@dataclass(frozen=True, kw_only=True)
class Power:
    """A simulated hwmon power sensor: ``idle_w + active_w * CPU utilisation``.

    ``window_s`` is the utilisation averaging window: a CPU quota runs the device in bursts
    (15 ms of every 100 ms period at 0.15 CPU), which a window shorter than a few periods would
    see as "full" or "idle".
    """

    idle_w: float
    active_w: float
    sample_hz: float
    window_s: float = 0.3

    @property
    def note(self) -> str:
        """The fleet file's ``energy.simulated``: what the sensor's number is."""
        return (f"hwmon power sensor SIMULATED from the device's CPU time ({self.idle_w} W idle "
                f"+ {self.active_w} W x utilisation over {self.window_s} s), not a meter")


@dataclass(frozen=True, kw_only=True)
class Kind:
    """How to build one kind of device.

    ``arch`` is the Debian architecture of a foreign root (None: this machine's own userland),
    ``personality`` the ``setarch`` name sshd runs under, ``cpus`` a CPU quota (in CPUs),
    ``simulated`` what about the device is not real (copied to fleet.yaml and every row).
    """

    name: str
    device_class: str
    description: str
    arch: str | None = None
    personality: str | None = None
    cpus: float | None = None
    link: Link | None = None
    power: Power | None = None
    simulated: str | None = None


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(name="x86", device_class="x86",
             description="this machine's userland in a network namespace (baseline)"),
        Kind(name="x86-slow", device_class="x86",
             description="x86 behind a 2 Mbit/s link dropping 1 % of packets",
             link=Link(rate_kbit=2000, loss_percent=1.0),
             simulated="link shaped to 2 Mbit/s with 1 % random loss (tc tbf + nftables)"),
        # A 500 MHz Atom core does roughly 1/6 of the single-thread work of one core here, so
        # the whole device (both of its cores included) is capped at 0.15 of one host CPU.
        Kind(name="edison", device_class="edison",
             description="Intel Edison stand-in: 32-bit i386 root, i686, CPU capped at 15 %, "
                         "simulated hwmon power sensor",
             arch="i386", personality="i686", cpus=0.15,
             power=Power(idle_w=0.35, active_w=0.65, sample_hz=20.0),
             # The sensor's own note is Power.note (fleet.yaml energy.simulated).
             simulated="i386 root on an x86-64 CPU capped at 0.15 CPU (stands in for a 500 MHz "
                       "Atom)"),
        Kind(name="arm64", device_class="arm64",
             description="Debian arm64 root emulated by qemu-user (functional truth only)",
             arch="arm64",
             simulated="aarch64 emulated by qemu-user: functional only, timings not "
                       "representative"),
        Kind(name="armhf", device_class="armhf",
             description="Debian armhf root emulated by qemu-user (functional truth only)",
             arch="armhf",
             simulated="armv7l emulated by qemu-user: functional only, timings not "
                       "representative"),
    )
}

#: What ``sandbox up`` starts when no list is given (armhf only on request: 30 s more to build).
DEFAULT_KINDS = ("x86", "x86-slow", "edison", "arm64")


def name_devices(kinds: Sequence[str] | None) -> list[tuple[str, Kind]]:
    """Device names for a list of kinds (``x86,x86`` -> ``x86-1, x86-2``).

    Raises :class:`ConfigError` for an unknown kind, naming the accepted ones.
    """
    wanted = list(kinds) if kinds else list(DEFAULT_KINDS)
    named: list[tuple[str, Kind]] = []
    counts: dict[str, int] = {}
    for raw in wanted:
        kind = raw.strip()
        if kind not in KINDS:
            raise ConfigError(f"sandbox: unknown device kind {kind!r}; accepted: "
                              f"{', '.join(KINDS)}")
        counts[kind] = counts.get(kind, 0) + 1
        named.append((f"{kind}-{counts[kind]}", KINDS[kind]))
    if not named:
        raise ConfigError("sandbox: empty device list; accepted kinds: " + ", ".join(KINDS))
    return named
