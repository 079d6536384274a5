"""Runtimes on the sandbox devices: onnxruntime where PyPI has a wheel for the device's CPU (x86,
arm64), numpy only where it has none (the Edison stand-in's i686, armhf), and ``backend: auto``
measuring with what each device has.

Real devices (the session ``sandbox``; armhf in its own, marked ``slow``), the real agent, real
measurements. arm64 and armhf run under qemu: these tests check what runs, never how fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deepfleet.artifact import Artifact
from deepfleet.errors import ConfigError, DeviceError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device, load_fleet
from deepfleet.orchestrator.measure import MeasureSettings, measure_many
from deepfleet.orchestrator.results import read_results
from deepfleet.orchestrator.transport import open_transport
from deepfleet.sandbox import SandboxState, _roots, _runtimes
from deepfleet.sandbox._runtimes import ONNXRUNTIME
from tests.conftest import QUICK_REQUEST

#: Which backend each device must measure with under ``backend: auto``.
AUTO = {"x86-1": "onnxruntime", "x86-slow-1": "onnxruntime", "edison-1": "numpy",
        "arm64-1": "onnxruntime"}
MACHINE = {"x86-1": "x86_64", "x86-slow-1": "x86_64", "edison-1": "i686", "arm64-1": "aarch64",
           "armhf-1": "armv7l"}


def _device(state: SandboxState, name: str) -> Device:
    if name in state.skipped:
        pytest.fail(f"sandbox skipped {name} although running as root: {state.skipped[name]}")
    return load_fleet(state.fleet_file)[name]


def _recorded(state: SandboxState, name: str) -> tuple[str | None, str | None]:
    (rec,) = (d for d in state.devices if d.name == name)
    return rec.onnxruntime, rec.onnxruntime_note


def check_runtimes(state: SandboxState, name: str, artifact: Artifact) -> None:
    """What ``up`` recorded, what the agent's hello lists, and an explicit ``onnxruntime``
    request: measured and equal to numpy's outputs where installed, refused where not."""
    has_ort = MACHINE[name] in ("x86_64", "aarch64")
    version, note = _recorded(state, name)
    assert version == (ONNXRUNTIME if has_ort else None), note
    if not has_ort:
        assert note is not None and f"no wheel for {MACHINE[name]}" in note
    request = {**QUICK_REQUEST, "backend": "onnxruntime"}
    with DeviceSession(_device(state, name)) as session:
        hello = session.connect()
        assert hello["machine"] == MACHINE[name]
        assert hello["backend_versions"]["numpy"] == hello["numpy"]
        if not has_ort:
            assert "onnxruntime" not in hello["backends"]
            with pytest.raises(DeviceError, match=rf"device '{name}'.*\(backend_unavailable\)"):
                session.measure(artifact.path, request)
            return
        assert "onnxruntime" in hello["backends"], hello["backends"]
        assert hello["backend_versions"]["onnxruntime"] == ONNXRUNTIME
        if MACHINE[name] == "x86_64":  # from the sandbox's venv, not this machine's Python
            assert "/runtimes/" in session.device.python
            where = _module_file(session.device)
            assert where.startswith(str(Path(session.device.python).parents[1])), where
        resp = session.measure(artifact.path, request)
        assert resp["backend"] == "onnxruntime" and resp["runs"] == 5
        outs = {b: session.request({"op": "infer", "artifact": resp["artifact"], "backend": b,
                                    "batch": 3}, timeout=120) for b in ("onnxruntime", "numpy")}
    assert outs["onnxruntime"]["ok"] and outs["numpy"]["ok"], outs
    np.testing.assert_allclose(np.asarray(outs["onnxruntime"]["outputs"][0]),
                               np.asarray(outs["numpy"]["outputs"][0]), rtol=1e-4, atol=1e-5)


def _module_file(device: Device) -> str:
    with open_transport(device) as t:
        return t.run([device.python, "-c", "import onnxruntime; print(onnxruntime.__file__)"],
                     timeout=60).strip()


def auto_settings() -> MeasureSettings:
    """A quick ``backend: auto`` request; skips while the agent does not know ``auto`` yet."""
    try:
        return MeasureSettings(request={**QUICK_REQUEST, "backend": "auto"}, reference_every=0)
    except ConfigError as exc:
        pytest.skip(f"backend 'auto' is not in this agent's protocol yet: {exc}")


def check_auto(devices: list[Device], artifact: Artifact, root: Path,
               expected: dict[str, str]) -> None:
    """One artifact measured with ``backend: auto`` on every device: each row names the backend
    the device has, and a numpy row says why onnxruntime was not used."""
    outcomes = measure_many(devices, [artifact.path], results_root=root,
                            settings=auto_settings())
    assert [o.device for o in outcomes] == list(expected)
    for o in outcomes:
        assert o.ok, o.error
        row = o.row
        assert row["backend"] == expected[o.device], row.get("backend_note")
        if expected[o.device] == "onnxruntime":  # the device's first preference: no note
            assert row["backend_version"] == ONNXRUNTIME and row["backend_note"] is None
        else:  # a fallback, and the row says why
            assert "onnxruntime not installed" in (row["backend_note"] or ""), row
    df = read_results(root)
    assert dict(zip(df["device"], df["backend"], strict=True)) == expected


@pytest.mark.parametrize("name", list(AUTO))
def test_each_device_has_onnxruntime_where_a_wheel_exists(sandbox: SandboxState, name: str,
                                                          tiny_artifact: Artifact) -> None:
    check_runtimes(sandbox, name, tiny_artifact)


def test_auto_measures_with_onnxruntime_where_installed_else_numpy(
        sandbox: SandboxState, tiny_artifact: Artifact, tmp_path: Path) -> None:
    devices = [_device(sandbox, n) for n in AUTO]
    check_auto(devices, tiny_artifact, tmp_path / "results", AUTO)


@pytest.mark.slow
def test_armhf_has_numpy_only(sandbox_armhf: SandboxState, tiny_artifact: Artifact) -> None:
    check_runtimes(sandbox_armhf, "armhf-1", tiny_artifact)


@pytest.mark.slow
def test_auto_falls_back_to_numpy_on_armhf(sandbox_armhf: SandboxState, tiny_artifact: Artifact,
                                           tmp_path: Path) -> None:
    check_auto([_device(sandbox_armhf, "armhf-1")], tiny_artifact, tmp_path / "results",
               {"armhf-1": "numpy"})


# ---------------------------------------------------------------- without devices (run anywhere)


def test_no_wheel_for_i686_or_armv7l_says_so() -> None:
    for machine in ("i686", "armv7l"):
        assert not _runtimes.has_wheel(machine)
        with pytest.raises(DeviceError, match=rf"no wheel for {machine} on PyPI.*numpy only"):
            _runtimes.wheel(machine, "3.11")


def test_root_cache_key_names_the_onnxruntime_it_holds() -> None:
    assert _roots.tarball_path("arm64").name == \
        f"debian-bookworm-arm64-r{_roots.RECIPE}-onnxruntime{ONNXRUNTIME}.tar.zst"
    for arch in ("i386", "armhf"):
        assert _roots.onnxruntime_in(arch) is None
        assert _roots.tarball_path(arch).name == f"debian-bookworm-{arch}-r{_roots.RECIPE}.tar.zst"


def _wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_unpack_wheel_installs_an_importable_package(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {
        "demo/__init__.py": "ANSWER = 42\n",
        "demo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"})
    site = tmp_path / "site"
    _runtimes.unpack_wheel(whl, site)
    out = subprocess.run([sys.executable, "-c", "import demo, importlib.metadata as m; "
                          "print(demo.ANSWER, m.version('demo'))"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["42", "1.0"]  # importable, and its version found as the agent finds it
    assert (site / "demo-1.0.dist-info" / "INSTALLER").read_text() == "deepfleet-sandbox\n"


def test_unpack_wheel_refuses_files_meant_outside_site_packages(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", {
        "demo/__init__.py": "", "demo-1.0.data/scripts/demo": "#!/bin/sh\n",
        "demo-1.0.dist-info/METADATA": "Name: demo\n"})
    with pytest.raises(DeviceError, match=r"demo-1.0.data/scripts/demo.*needs pip"):
        _runtimes.unpack_wheel(whl, tmp_path / "site")
    assert not (tmp_path / "site" / "demo").exists()
