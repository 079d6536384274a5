"""The fleet file: valid files load; every kind of mistake is a ConfigError that names it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deepfleet.errors import ConfigError
from deepfleet.orchestrator.fleet import (
    LOCAL_DEVICE,
    EnergySpec,
    PowerSpec,
    load_fleet,
    local_fleet,
)

FP = "SHA256:" + "A" * 43


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "id").write_text("key")
    (tmp_path / "kh").write_text("")
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "fleet.yaml"
    path.write_text(text)
    return path


GOOD = f"""
defaults:
  user: root
  key: id
devices:
  - name: edison-1
    host: 10.0.0.7
    class: edison
    known_hosts: kh
    energy: {{source: hwmon, path: /sys/class/hwmon/hwmon2, sample_hz: 50}}
    tags: [lab, slow]
    simulated: true
  - name: pi-1
    host: pi.lan
    port: 2222
    user: pi
    class: arm64
    host_key: {FP}
    python: /usr/bin/python3.11
    workdir: /opt/df
    energy: {{source: command, command: "ina219 --bus 1"}}
"""


def test_good_file_loads_with_defaults_and_relative_paths(files: Path) -> None:
    fleet = load_fleet(write(files, GOOD))
    assert fleet.names == ("edison-1", "pi-1")
    edison, pi = fleet["edison-1"], fleet["pi-1"]
    assert edison.user == "root" and edison.port == 22 and edison.key == files / "id"
    assert edison.known_hosts == files / "kh" and edison.host_key is None
    assert edison.energy == EnergySpec(source="hwmon", path="/sys/class/hwmon/hwmon2",
                                       sample_hz=50.0)
    assert edison.tags == ("lab", "slow") and edison.simulated == "simulated"
    assert edison.workdir == "~/.deepfleet" and edison.python == "python3"
    assert pi.user == "pi" and pi.port == 2222 and pi.host_key == FP
    assert pi.energy.command == ("ina219", "--bus", "1")
    assert fleet.of_class("arm64") == (pi,)
    with pytest.raises(ConfigError, match="no device named 'nope'.*edison-1, pi-1"):
        fleet["nope"]


def test_energy_simulated_note_loads_and_reaches_the_agent_request(files: Path) -> None:
    from deepfleet.orchestrator.device import energy_request

    body = (f"  - {BASE}\n    energy: {{source: hwmon, path: /s, simulated: model of CPU time}}\n"
            f"  - {BASE.replace('name: d1', 'name: d2')}\n    energy: {{source: hwmon, "
            "simulated: true}\n    simulated: qemu\n"
            f"  - {BASE.replace('name: d1', 'name: d3')}\n    simulated: qemu\n")
    fleet = load_fleet(write(files, "devices:\n" + body))
    assert fleet["d1"].energy.simulated == "model of CPU time"
    assert fleet["d2"].energy.simulated == "simulated sensor"
    assert energy_request(fleet["d1"]) == {"source": "hwmon", "path": "/s", "sample_hz": 10.0,
                                           "simulated": "model of CPU time"}
    # An emulated CPU says nothing about the sensor: a real sensor's energy stays measured.
    assert fleet["d3"].energy.simulated is None and "simulated" not in energy_request(fleet["d3"])


def test_backends_and_power_load_from_defaults_or_the_device_and_reach_the_request(files: Path) -> None:
    from deepfleet.orchestrator.device import DeviceSession

    text = ("defaults:\n  backends: [numpy]\n  power: {active_w: 2.5}\ndevices:\n"
            f"  - {BASE}\n"
            f"  - {BASE.replace('name: d1', 'name: d2')}\n    backends: [onnxruntime, numpy]\n"
            "    power: {active_w: 4, idle_w: 1.5}\n")
    fleet = load_fleet(write(files, text))
    d1, d2 = fleet["d1"], fleet["d2"]
    assert d1.backends == ("numpy",) and d1.power == PowerSpec(active_w=2.5)
    assert d2.backends == ("onnxruntime", "numpy") and d2.power == PowerSpec(active_w=4.0, idle_w=1.5)
    assert LOCAL_DEVICE.backends == ("onnxruntime", "numpy") and LOCAL_DEVICE.power is None
    plain = load_fleet(write(files, f"devices:\n  - {BASE}\n"))["d1"]
    assert plain.backends == ("onnxruntime", "numpy") and plain.power is None  # the defaults
    # what a session adds to every measure request it sends
    sent: list[dict] = []

    class Recorder(DeviceSession):
        def connect(self) -> dict:
            return {}

        def request(self, req: dict, timeout: float) -> dict:
            sent.append(req)
            return {"ok": True}

    Recorder(d2).measure(files, {"warmup": 1})
    assert sent[0]["backends"] == ["onnxruntime", "numpy"]
    assert sent[0]["power"] == {"active_w": 4.0, "idle_w": 1.5}
    Recorder(plain).measure(files, {"backends": ["numpy"]})  # a request's own value stays
    assert sent[1]["backends"] == ["numpy"] and "power" not in sent[1]


def test_sensor_power_loads_and_a_device_overrides_defaults_sensor_by_sensor(files: Path) -> None:
    text = """
defaults:
  user: root
  key: id
  known_hosts: kh
  sensors: {accelerometer: {mw: 0.2}, gyroscope: {mw: 6.0}}
devices:
  - {name: a, host: h1, class: x86}
  - {name: b, host: h2, class: x86, sensors: {gyroscope: {mw: 4}, microphone: {mw: 1.5}}}
"""
    fleet = load_fleet(write(files, text))
    assert fleet["a"].sensor_mw == {"accelerometer": 0.2, "gyroscope": 6.0}
    assert fleet["b"].sensor_mw == {"accelerometer": 0.2, "gyroscope": 4.0, "microphone": 1.5}
    assert LOCAL_DEVICE.sensor_mw == {}


def test_local_fleet_is_this_machine_without_ssh() -> None:
    fleet = local_fleet()
    assert fleet.names == ("local",) and fleet.path is None
    assert LOCAL_DEVICE.is_local and LOCAL_DEVICE.python == sys.executable


BASE = "name: d1\n    host: h\n    user: u\n    key: id\n    class: x86\n    known_hosts: kh"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # each case: the YAML under `devices:`, and what the message must contain
        (f"  - {BASE}\n    colour: red", r"device 'd1': key 'colour': got 'red'.*only the keys"),
        (f"  - {BASE}\n    port: 70000", r"key 'port': got 70000 \(int\).*1 to 65535"),
        (f"  - {BASE}\n    port: '22'", r"key 'port': got '22' \(str\)"),
        (f"  - {BASE}\n    port: true", r"key 'port': got True"),
        (f"  - {BASE}\n  - {BASE}", r"devices\[1\].name': got 'd1'.*not used by another"),
        (f"  - {BASE.replace('key: id', 'key: missing')}",
         r"key 'key': got 'missing'.*does not exist"),
        (f"  - {BASE}\n    host_key: {FP}", r"exactly one of host_key .* or known_hosts"),
        (f"  - {BASE.replace('known_hosts: kh', 'host_key: MD5:aa')}",
         r"key 'host_key': got 'MD5:aa'.*SHA256:"),
        (f"  - {BASE.replace('user: u', 'user: 5')}", r"key 'user': got 5 \(int\)"),
        (f"  - {BASE.replace('    class: x86', '')}", r"key 'class': got nothing.*required"),
        (f"  - {BASE}\n    energy: {{source: rapl2}}",
         r"'energy.source': got 'rapl2'.*auto, rapl, hwmon, power_supply, command, none"),
        (f"  - {BASE}\n    energy: {{source: command}}", r"'energy.command'.*exactly when"),
        (f"  - {BASE}\n    energy: {{source: hwmon, sample_hz: 0}}", r"'energy.sample_hz'"),
        (f"  - {BASE}\n    energy: {{source: hwmon, simulated: 3}}",
         r"'energy.simulated': got 3 \(int\).*true/false or a note"),
        (f"  - {BASE}\n    energy: {{source: none, simulated: true}}",
         r"'energy.simulated': got True.*source is 'none'"),
        (f"  - {BASE}\n    tags: lab", r"key 'tags': got 'lab'.*list"),
        (f"  - {BASE}\n    backends: [tflite]",
         r"key 'backends': got \['tflite'\].*numpy, onnxruntime, torch.*'tflite' is not one"),
        (f"  - {BASE}\n    backends: []", r"key 'backends': got \[\].*non-empty list"),
        (f"  - {BASE}\n    backends: [numpy, numpy]", r"key 'backends'.*distinct"),
        (f"  - {BASE}\n    backends: numpy", r"key 'backends': got 'numpy' \(str\)"),
        (f"  - {BASE}\n    power: 2.5", r"key 'power': got 2.5.*active_w"),
        (f"  - {BASE}\n    power: {{idle_w: 1}}", r"key 'power.active_w': got nothing.*watts > 0"),
        (f"  - {BASE}\n    power: {{active_w: 1, idle_w: 2}}", r"'power.idle_w': got 2.*below active_w"),
        (f"  - {BASE}\n    power: {{active_w: 1, peak_w: 2}}", r"'power.peak_w'.*only the keys"),
        (f"  - {BASE.replace('name: d1', 'name: bad/name')}", r"devices\[0\].name': got 'bad/name'"),
        ("  - just-a-string", r"devices\[0\]': got 'just-a-string'"),
        (f"  - {BASE}\n    sensors: [gyroscope]", r"key 'sensors': got \['gyroscope'\].*\{mw: power"),
        (f"  - {BASE}\n    sensors: {{gyroscope: 6}}", r"key 'sensors.gyroscope': got 6 \(int\).*\{mw:"),
        (f"  - {BASE}\n    sensors: {{gyroscope: {{mw: -1}}}}", r"key 'sensors.gyroscope.mw': got -1.*>= 0"),
        (f"  - {BASE}\n    sensors: {{gyroscope: {{mw: 6, ua: 3}}}}", r"key 'sensors.gyroscope'"),
    ],
)
def test_bad_entries_name_file_device_key_value(files: Path, body: str, expected: str) -> None:
    path = write(files, "devices:\n" + body + "\n")
    with pytest.raises(ConfigError, match=expected) as info:
        load_fleet(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("devices: [\n", r"not valid YAML"),
        ("- a\n- b\n", r"\(top level\)': got \['a', 'b'\]"),
        ("devices: []\n", r"key 'devices': got \[\].*non-empty list"),
        ("device: []\n", r"key 'device'.*only the top-level keys"),
        ("defaults: {name: x}\ndevices: [{}]\n", r"key 'defaults'"),
    ],
)
def test_bad_top_level(files: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_fleet(write(files, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read the fleet file"):
        load_fleet(tmp_path / "nope.yaml")
