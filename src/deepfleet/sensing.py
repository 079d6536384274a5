"""Sensing energy: what the sensors an artifact still reads cost per inference (an estimate).

One inference needs one window of signal from every sensor the model still reads: the
artifact's manifest names them (``sensors_kept``) and the window (``window_s``, from the data:
T / sample_hz, or its ``window_s``); the fleet file gives each device's sensor power
(``sensors: {gyroscope: {mw: 6.0}}``, datasheet figures). The estimate is

    sensing energy per run (mJ) = batch x window_s x sum over kept sensors of power (mW),

the sensors held on for the whole window and nothing else (no duty cycling, no wake-up cost,
non-overlapping windows). It is **estimated** from datasheet figures, never measured, and kept
apart from compute energy: results rows carry it in ``sensing_energy_mj`` with its basis in
``sensing_basis`` (:func:`sensing_energy`), and :mod:`deepfleet.metrics` reads it as
``energy_sensing``; ``energy_total`` adds it to the operation-count compute estimate, both
estimates.

Computed on the host, where the fleet file and the manifest are, when a measurement row is
written: it needs nothing from the device (no agent change, no protocol field, the same figure
whichever agent version measured the row), and a row records the basis, so a report can
recompute it. Pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SensingEnergy", "missing_sensors", "sensing_energy"]


@dataclass(frozen=True)
class SensingEnergy:
    """``mj``: sensing energy per run (None when it cannot be estimated); ``basis``: how it was
    estimated, or why not (one line, stored with the row)."""

    mj: float | None
    basis: str


def missing_sensors(sensors: list[str] | tuple[str, ...], power_mw: Mapping[str, float]) -> list[str]:
    """The sensors of ``sensors`` that ``power_mw`` gives no power for."""
    return [s for s in sensors if s not in power_mw]


def sensing_energy(manifest: Mapping[str, Any], power_mw: Mapping[str, float], *, batch: int = 1,
                   device: str = "the device") -> SensingEnergy:
    """The sensing energy of one run of ``batch`` inferences of the artifact of ``manifest`` on
    a device whose sensors draw ``power_mw`` ({name: mW}, from the fleet file)."""
    kept = manifest.get("sensors_kept")
    window = manifest.get("window_s")
    if kept is None:
        return SensingEnergy(None, "no sensing energy: the artifact's data names no sensors")
    if window is None:
        return SensingEnergy(None, "no sensing energy: the data gives no window (sample_hz or window_s)")
    missing = missing_sensors(kept, power_mw)
    if missing:
        return SensingEnergy(None, f"no sensing energy: the fleet file gives {device} no power for "
                                   f"{', '.join(missing)} (sensors: {{NAME: {{mw: ...}}}})")
    total_mw = sum(float(power_mw[s]) for s in kept)
    parts = " + ".join(f"{s} {power_mw[s]:g} mW" for s in kept) or "no sensor"
    return SensingEnergy(
        batch * float(window) * total_mw,
        f"estimated from datasheet power in the fleet file: ({parts}) x {float(window):g} s window"
        f" x batch {batch}",
    )
