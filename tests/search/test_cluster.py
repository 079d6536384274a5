"""A real multi-node Ray cluster on one machine: `ray start --head` and `ray start --address`
as separate processes, then `deepfleet search --address` against it."""

from __future__ import annotations

import json
import os
import secrets
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


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([RAY, "start", *args], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, f"ray start {' '.join(args)} failed:\n{proc.stderr[-3000:]}"


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """Head and worker as separate `ray start` processes, with token authentication as on a
    real cluster (Ray >= 2.59 turns it on for `ray start --head`): every node and the driver
    share one token, as cluster.yaml arranges with its file mount."""
    port = _free_port()
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        _ray_start(["--head", f"--port={port}", "--include-dashboard=false", *common], env)
        _ray_start([f"--address=127.0.0.1:{port}", *common], env)
        yield f"127.0.0.1:{port}", env
    finally:
        _kill_cluster(port)


def test_search_runs_on_a_two_node_ray_cluster(tmp_path: Path, two_node_cluster) -> None:
    address, env = two_node_cluster
    # 1 CPU per node and 1 CPU per trial: two trials at once must use both nodes. Trainings
    # of a few seconds: a sub-second one can finish before Ray spills the second to node 2,
    # which then reuses the first node's warm worker (seen on a quiet machine).
    study = write_study(tmp_path, name="cluster", trials=2, parallelism=2, training={"finetune_epochs": 8},
                        space={"deepiot.target": 0.1, "deepiot.iterations": 400, "deepiot.eval_every": 400})
    proc = run_search(tmp_path, str(study), "--address", address, "--out", "run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["trials"]["complete"] == 2, summary["devices"]
    assert summary["ray_resources"]["CPU"] == 2.0
    cands = read_candidates(tmp_path / "run" / "candidates", study="cluster")
    nodes = set(cands[cands["kind"] == "candidate"]["node"])
    assert len(nodes) == 2, cands[["trial", "kind", "node", "created_at"]].to_string()
