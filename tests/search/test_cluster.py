"""A real multi-node Ray cluster on one machine: `ray start --head` and `ray start --address`
as separate processes, then `deepfleet search --address` against it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepfleet.orchestrator.candidates import read_candidates
from tests.search.test_search_e2e import run_search, write_study

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_cluster(port: int) -> None:
    """Kill this cluster's processes only (`ray stop` would kill every Ray on the machine):
    each of them names the cluster's GCS port on its command line."""
    marks = (f":{port}", f"port={port}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone already
        if any(m in cmd for m in marks):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, capture_output=True, env=env, timeout=180)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common],
                       check=True, capture_output=True, env=env, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        _kill_cluster(port)


def test_search_runs_on_a_two_node_ray_cluster(tmp_path: Path, two_node_cluster: str) -> None:
    # 1 CPU per node and 1 CPU per trial: two trials at once must use both nodes
    study = write_study(tmp_path, name="cluster", trials=2, parallelism=2)
    proc = run_search(tmp_path, str(study), "--address", two_node_cluster, "--out", "run", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["trials"]["complete"] == 2
    assert summary["ray_resources"]["CPU"] == 2.0
    cands = read_candidates(tmp_path / "run" / "candidates", study="cluster")
    nodes = set(cands[cands["kind"] == "candidate"]["node"])
    assert len(nodes) == 2, f"both nodes trained a trial: {nodes}"
