"""Benchmark of the device agent (issue: device agent and fleet). Prints and saves JSON.

Parts (``--parts``, comma list; each is merged into the JSON file under its own key):

``local``: starts ``agent.py serve`` as a subprocess on this machine (the built-in ``local``
device) and measures, over the JSON-lines pipe:

* ``startup``   spawn to first ``hello`` reply (what a device session pays once);
* ``ping``      round trip of the cheapest request (the protocol's own cost), p50 / p90;
* ``overhead``  per-measurement overhead: wall time of a ``measure`` request as the client sees
                it, minus the model's own runs inside it (warm-up time + the sum of the timed
                latencies), p50 / p90 over ``--requests`` requests of a cached artifact;
* ``first_measure`` the same for the first request of an artifact (hash check + load);
* ``repeat``    p50 of one artifact (lenet5, random weights, 1 thread) measured ``--repeats``
                times with the default stopping rule (CI of the median within 2 %): the p50s,
                their coefficient of variation, and each run's CI width, runs and stop reason.

``ssh``: the same agent through a :class:`DeviceSession` over loopback SSH (an sshd on
127.0.0.1 started here, verified host key, Paramiko):

* ``first_contact_s``  connect + deploy agent.py into an empty work dir + start + ``hello``;
  ``reconnect_s`` the same when agent.py is already there (hash check only);
* ``ping_ms``      round trip of ``ping`` over the channel;
* ``overhead_ms``  per-measurement overhead of the persistent session: ``DeviceSession.measure``
                   wall time minus the model's own runs (warm-up + timed latencies);
* ``repeat``       as for local, over SSH, threads pinned (1 BLAS thread, one CPU).

``lenet5``: p50 of the compressed lenet5 against the original (the two artifacts of one
``deepfleet compress lenet5 --data digits`` run, given by ``--lenet-summary``, the JSON it
prints) on the local device and on sandbox devices (x86 in a namespace, and the Edison
stand-in with its simulated sensor), batch 1 and batch 64, threads pinned, CI stopping rule.
The sandbox part needs root; without it only the local device is measured.

    PYTHONPATH=src python benchmarks/agent_overhead.py [--parts local,ssh,lenet5]
        [--requests 200] [--repeats 5] [--lenet-summary compress.json] [--cpu 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfleet.artifact import Artifact, write_artifact
from deepfleet.compressors._export import export_graph
from deepfleet.device_agent import bundle
from deepfleet.models import build_model

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "agent_overhead.json"


class Agent:
    """The agent (the built, shipped file) as a subprocess; ``request`` sends one JSON line and
    reads one back."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(bundle.agent_file()), "serve"], cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)

    def request(self, obj: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """(reply, client wall seconds)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        t0 = time.perf_counter()
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        wall = time.perf_counter() - t0
        if not line:
            raise RuntimeError(f"agent exited with status {self.proc.wait()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"agent refused {obj.get('op')}: {reply}")
        return reply, wall

    def close(self) -> None:
        self.request({"op": "bye"})
        self.proc.wait(10)


def _artifact(root: Path, name: str, shape: tuple[int, ...]) -> Artifact:
    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=10).eval()
    ex = export_graph(model, shape)
    return write_artifact(root, ex.graph, ex.arrays,
                          {"model": name, "params": ex.params, "macs": ex.macs,
                           "input_shape": list(shape)})


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run(requests: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = _artifact(root / "artifacts", "mlp", (1, 28, 28))
        lenet = _artifact(root / "artifacts", "lenet5", (1, 28, 28))
        t0 = time.perf_counter()
        agent = Agent(root)
        hello, _ = agent.request({"op": "hello"})
        startup_s = time.perf_counter() - t0
        try:
            pings = [agent.request({"op": "ping"})[1] * 1e3 for _ in range(requests)]

            # the protocol's own cost: a cached model (agent 0.4.0 loads afresh by default,
            # which runtime_footprint.py measures) in the numpy runtime the figures were taken with
            quick = {"op": "measure", "artifact": str(small.path), "warmup": 0, "min_runs": 5,
                     "max_runs": 5, "min_seconds": 0, "ci_target": None, "threads": 1,
                     "energy": {"source": "none"}, "fresh": False, "backend": "numpy"}

            def overhead_ms() -> tuple[float, dict[str, Any]]:
                r, wall = agent.request(quick)
                model_ms = r["timing_ms"]["warmup"] + sum(r["latencies_ms"])
                return wall * 1e3 - model_ms, r

            first_ms, first = overhead_ms()
            assert not first["model_cached"]
            overheads, inside = [], []
            for _ in range(requests):
                ms, r = overhead_ms()
                overheads.append(ms)
                inside.append(r["timing_ms"]["total"] - r["timing_ms"]["warmup"] - sum(r["latencies_ms"]))

            rep = []
            for _ in range(repeats):
                r, wall = agent.request({"op": "measure", "artifact": str(lenet.path), "threads": 1,
                                         "warmup": 20, "min_seconds": 1.0, "max_seconds": 10.0,
                                         "energy": {"source": "none"}})
                rep.append({"p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "p99_ms": r["p99_ms"],
                            "ci_rel_width": r["ci_rel_width"], "runs": r["runs"],
                            "stop_reason": r["stop_reason"], "wall_s": round(wall, 3)})
        finally:
            agent.close()
    p50s = [x["p50_ms"] for x in rep]
    return {
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "cpu_model": hello["cpu_model"], "cpu_count": hello["cpu_count"],
                    "loadavg_at_start": list(map(float, open("/proc/loadavg").read().split()[:3]))},
        "agent_version": hello["agent_version"],
        "startup_s": round(startup_s, 4),
        "ping_ms": {"p50": round(_pct(pings, 50), 4), "p90": round(_pct(pings, 90), 4),
                    "n": len(pings)},
        "overhead_ms": {
            "definition": "client wall time of a measure request minus warm-up time and the "
                          "sum of the timed latencies (5 runs of mlp/28x28, cached artifact)",
            "p50": round(_pct(overheads, 50), 4), "p90": round(_pct(overheads, 90), 4),
            "inside_agent_p50": round(_pct(inside, 50), 4),
            "n": len(overheads),
        },
        "first_measure_overhead_ms": round(first_ms, 3),
        "first_measure_load_ms": first["load_ms"],
        "repeat": {
            "artifact": "lenet5 (random weights), batch 1, 1 BLAS thread, ci_target 0.02, "
                        "min 1 s, max 10 s",
            "p50_ms": p50s,
            "cv": round(statistics.stdev(p50s) / statistics.mean(p50s), 5) if len(p50s) > 1 else None,
            "runs": rep,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="local,ssh", help="comma list of local, ssh, lenet5")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", type=int, default=None,
                        help="CPU to pin the SSH and lenet5 measurements to (default: the last)")
    parser.add_argument("--lenet-summary", type=Path, default=None,
                        help="JSON printed by `deepfleet compress lenet5 --data digits --json`")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"local", "ssh", "lenet5"})
    if unknown:
        parser.error(f"unknown part(s) {unknown}; accepted: local, ssh, lenet5")
    if "lenet5" in parts and args.lenet_summary is None:
        parser.error("--parts lenet5 needs --lenet-summary (the JSON of `deepfleet compress "
                     "lenet5 --data digits --json`)")
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if part == "local":
            result = run(args.requests, args.repeats)
        elif part == "ssh":
            from _agent_ssh import run_ssh  # type: ignore[import-not-found]

            result = run_ssh(requests=args.requests, repeats=args.repeats, cpu=cpu)
        else:
            from _agent_ssh import run_lenet  # type: ignore[import-not-found]

            result = run_lenet(json.loads(args.lenet_summary.read_text()), cpu=cpu)
        # Re-read before each write: parts may run in separate invocations.
        merged = json.loads(args.out.read_text()) if args.out.exists() else {}
        merged[part] = result
        args.out.write_text(json.dumps(merged, indent=1) + "\n")
        print(json.dumps({part: result}, indent=1))


if __name__ == "__main__":
    main()
