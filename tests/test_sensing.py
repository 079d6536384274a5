"""Sensing energy: kept sensors' datasheet power x the data's window, or a reason why none."""

from __future__ import annotations

import pytest

from deepfleet.sensing import missing_sensors, sensing_energy

POWER = {"accelerometer": 0.2, "gyroscope": 6.0}


def test_kept_sensors_power_times_window_times_batch() -> None:
    both = sensing_energy({"sensors_kept": ["accelerometer", "gyroscope"], "window_s": 1.28}, POWER)
    acc = sensing_energy({"sensors_kept": ["accelerometer"], "window_s": 1.28}, POWER, batch=4)
    assert both.mj == pytest.approx(6.2 * 1.28)  # mW x s = mJ
    assert acc.mj == pytest.approx(4 * 0.2 * 1.28)
    assert "estimated from datasheet power" in acc.basis and "batch 4" in acc.basis


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        ({"sensors_kept": None, "window_s": 1.0}, "names no sensors"),
        ({"sensors_kept": ["gyroscope"], "window_s": None}, "gives no window"),
        ({"sensors_kept": ["microphone"], "window_s": 1.0}, "gives pi-1 no power for microphone"),
        ({}, "names no sensors"),  # an artifact from before sensing keys
    ],
)
def test_no_estimate_without_sensors_window_or_power(manifest: dict, why: str) -> None:
    e = sensing_energy(manifest, POWER, device="pi-1")
    assert e.mj is None and why in e.basis


def test_missing_sensors_lists_those_without_power() -> None:
    assert missing_sensors(["gyroscope", "microphone", "baro"], POWER) == ["microphone", "baro"]
