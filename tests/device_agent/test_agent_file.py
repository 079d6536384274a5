"""The file shipped to devices: one file, Python >= 3.8, stdlib + numpy, nothing else.

The file is built by ``bundle.py`` from ``agent.py`` and its libraries; these tests run the
built file itself (never the package modules) wherever a device would.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepfleet.device_agent import bundle

SRC = Path(bundle.__file__).resolve().parents[2]  # the directory that holds deepfleet/

# Runs under `python -I`: no PYTHONPATH, no user site, no current directory on sys.path.
PROBE = """
import importlib, json, runpy, sys
before = set(sys.modules)
if sys.argv[1] == "file":
    runpy.run_path(sys.argv[2], run_name="probe")
else:  # a package module, from the source tree under test (not an installed copy)
    sys.path.insert(0, sys.argv[2])
    module = importlib.import_module(sys.argv[3])
    assert module.__file__.startswith(sys.argv[2]), module.__file__
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _foreign(loaded: list[str], allowed_ours: set[str]) -> list[str]:
    """Loaded modules that are neither stdlib, numpy, nor one of ``allowed_ours``."""
    bad = set()
    for name in loaded:
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == "numpy" or top.startswith("_"):
            continue
        if name in allowed_ours:
            continue
        bad.add(name)
    return sorted(bad)


def test_the_built_agent_imports_only_stdlib_and_numpy_in_isolated_mode(agent_file: Path) -> None:
    out = subprocess.run([sys.executable, "-I", "-c", PROBE, "file", str(agent_file)],
                         capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert _foreign(loaded, set()) == [], f"the built agent pulls in {_foreign(loaded, set())}"
    assert "numpy" in loaded  # the probe really ran the file


@pytest.mark.parametrize("name", bundle.LIBRARIES)
def test_each_library_imports_only_stdlib_numpy_and_the_other_libraries(name: str) -> None:
    ours = {"deepfleet", "deepfleet.device_agent"} | {f"deepfleet.device_agent.{lib}"
                                                       for lib in bundle.LIBRARIES}
    out = subprocess.run([sys.executable, "-I", "-c", PROBE, "module", str(SRC),
                          f"deepfleet.device_agent.{name}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert f"deepfleet.device_agent.{name}" in loaded
    assert _foreign(loaded, ours) == [], f"{name}.py pulls in {_foreign(loaded, ours)}"


@pytest.mark.parametrize("name", bundle.AGENT_MODULES)
def test_every_source_of_the_agent_is_python38_syntax(name: str) -> None:
    ast.parse((SRC / "deepfleet" / "device_agent" / f"{name}.py").read_text(), feature_version=(3, 8))


def test_the_built_agent_is_one_python38_file_without_package_imports(agent_file: Path) -> None:
    tree = ast.parse(agent_file.read_text(), feature_version=(3, 8))
    ours = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepfleet")
            or isinstance(node, ast.Import) and any(a.name.startswith("deepfleet") for a in node.names)]
    assert ours == [], f"the built agent still imports deepfleet at lines {ours}"
    assert agent_file.read_text().startswith("#!/usr/bin/env python3\n")


def _interpreters() -> list[str]:
    """This Python, and the system's python3 (another numpy, as on a device) where it differs."""
    found = [sys.executable]
    system = Path("/usr/bin/python3")
    if system.exists() and system.resolve() != Path(sys.executable).resolve():
        found.append(str(system))
    return found


@pytest.mark.parametrize("python", _interpreters())
def test_hello_of_the_built_file_reports_the_version_and_hash_the_host_expects(
        python: str, agent_file: Path, tmp_path: Path) -> None:
    if subprocess.run([python, "-I", "-c", "import numpy"], capture_output=True).returncode:
        pytest.skip(f"{python} has no numpy, which the agent needs")
    # Run from an empty directory in isolated mode: nothing but the file itself is available.
    out = subprocess.run([python, "-I", str(agent_file), "hello"], cwd=tmp_path,
                         capture_output=True, text=True, check=True, timeout=120)
    hello = json.loads(out.stdout)
    assert hello["ok"] is True
    assert hello["agent_version"] == bundle.agent_version()
    assert hello["agent_sha256"] == bundle.agent_sha256() == hashlib.sha256(
        agent_file.read_bytes()).hexdigest() == agent_file.parent.name
    version = subprocess.run([python, "-I", str(agent_file), "--version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.strip() == bundle.agent_version()
