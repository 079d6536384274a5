"""agent.py is the one file shipped to devices: Python >= 3.8, stdlib + numpy, nothing else."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import deepfleet.device_agent.agent as agent_module

AGENT = Path(agent_module.__file__)

PROBE = """
import json, runpy, sys
before = set(sys.modules)
runpy.run_path(sys.argv[1], run_name="probe")
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_agent_imports_only_stdlib_and_numpy_in_isolated_mode() -> None:
    out = subprocess.run([sys.executable, "-I", "-c", PROBE, str(AGENT)], capture_output=True,
                         text=True, check=True)
    loaded = json.loads(out.stdout)
    tops = {m.split(".")[0] for m in loaded}
    foreign = sorted(t for t in tops if t not in sys.stdlib_module_names and t != "numpy" and not t.startswith("_"))
    assert foreign == [], f"agent.py pulls in {foreign}"
    assert "numpy" in tops  # the probe really ran the file


def test_agent_source_is_python38_syntax() -> None:
    ast.parse(AGENT.read_text(), feature_version=(3, 8))
