"""check_devices and the energy line it shows (the fault cases are in test_faults.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from deepfleet.orchestrator.check import check_devices, describe_energy, describe_runtimes
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device, EnergySpec

SIM = {"source": "hwmon", "path": "/var/sim/hwmon0", "sensor": "deepfleet_sim power1",
       "kind": "power", "simulated": True}
RAPL = {"source": "rapl", "path": "/sys/class/powercap/intel-rapl:0", "sensor": "package-0",
        "kind": "energy", "simulated": False}


def _with(device: Device, **energy: object) -> Device:
    return dataclasses.replace(device, energy=EnergySpec(**energy))  # type: ignore[arg-type]


def test_energy_line_follows_the_fleet_file_and_what_the_agent_found(
        local_device: Device) -> None:
    hello = {"energy_sources": [RAPL, SIM]}
    assert describe_energy(_with(local_device, source="none"), hello) == \
        "none (fleet file): estimates only"
    assert describe_energy(_with(local_device, source="command", command=("ina219", "-b", "1")),
                           hello) == "command: ina219 -b 1"
    assert describe_energy(_with(local_device), hello) == "rapl: package-0"  # auto: rapl first
    assert describe_energy(_with(local_device, source="hwmon", path="/var/sim/hwmon0"), hello) \
        == "hwmon: deepfleet_sim power1 [says simulated]"
    assert describe_energy(_with(local_device, source="hwmon", path="/elsewhere"), hello) == \
        "none found (hwmon at /elsewhere): estimates only"
    assert describe_energy(_with(local_device), {"energy_sources": []}) == \
        "none found (rapl, hwmon or power_supply): estimates only"


def test_every_device_gets_a_row_in_the_given_order(
        local_device: Device, python_without_numpy: str,
        fast_session: Callable[[Device], DeviceSession]) -> None:
    broken = dataclasses.replace(local_device, name="broken", python=python_without_numpy)
    checks = check_devices([broken, local_device], session_factory=fast_session)
    assert [c.device for c in checks] == ["broken", "local"]
    bad, good = checks
    assert not bad.reachable and bad.error is not None and "has no numpy" in bad.error
    assert good.reachable and good.error is None and good.python and good.numpy
    assert good.agent_version and good.energy and good.seconds > 0


def test_runtimes_line_lists_versions_and_what_auto_picks(local_device: Device) -> None:
    hello = {"backends": ["numpy", "onnxruntime"], "backend_versions": {"numpy": "2.4.6", "onnxruntime": "1.32.0"}}
    assert describe_runtimes(local_device, hello) == ("onnxruntime 1.32.0, numpy 2.4.6", "onnxruntime")
    edison = {"backends": ["numpy"], "backend_versions": {"numpy": "1.24.2"}}
    assert describe_runtimes(local_device, edison) == ("numpy 1.24.2", "numpy (no onnxruntime)")
    picky = dataclasses.replace(local_device, backends=("onnxruntime",))
    assert describe_runtimes(picky, edison)[1] == "none of onnxruntime (add numpy to backends)"


def test_check_shows_the_runtimes_each_device_has(local_device: Device, python_without_onnxruntime: str,
                                                  fast_session: Callable[[Device], DeviceSession]) -> None:
    import onnxruntime

    numpy_only = dataclasses.replace(local_device, name="numpy-only", python=python_without_onnxruntime)
    full, bare = check_devices([local_device, numpy_only], session_factory=fast_session)
    assert full.runtimes is not None and f"onnxruntime {onnxruntime.__version__}" in full.runtimes
    assert full.auto == "onnxruntime"
    assert bare.runtimes == f"numpy {bare.numpy}" and bare.auto == "numpy (no onnxruntime)"
