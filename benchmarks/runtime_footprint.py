"""What each runtime costs a device beyond latency: model load, first inference, peak memory, CPU
time, and the two energy estimates. Prints and saves JSON (benchmarks/results/runtime_footprint.json).

Zoo models with random weights (export_graph + write_artifact, so each has model.onnx) are measured
by the built agent on this machine, as a subprocess, in numpy and in onnxruntime (1 thread, each
model loaded afresh per request, ``--repeats`` requests per model and runtime; the medians are
reported), and once more in an interpreter without onnxruntime with ``backend: auto`` (the
fallback an Edison gets). The time-based estimate uses a stated power of ``--active-w`` watts.

    PYTHONPATH=src python benchmarks/runtime_footprint.py [--repeats 3] [--active-w 2.5]
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

import torch

from deepfleet.artifact import write_artifact
from deepfleet.compressors._export import export_graph
from deepfleet.device_agent import bundle
from deepfleet.models import build_model

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "runtime_footprint.json"
MODELS = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28), "deepsense": (6, 12), "vgg": (3, 16, 16)}
FIELDS = ("init_ms", "first_run_ms", "memory_peak_mb", "p50_ms", "cpu_p50_ms", "process_cpu_ms")


class Agent:
    def __init__(self, python: str, cwd: Path) -> None:
        self.proc = subprocess.Popen([python, str(bundle.agent_file()), "serve"], cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if not reply.get("ok"):
            raise RuntimeError(reply)
        return reply

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _numpy_only_python(directory: Path) -> str:
    """A venv whose site-packages holds only this interpreter's numpy (no onnxruntime)."""
    import venv

    import numpy

    venv.EnvBuilder(with_pip=False).create(directory)
    python = str(directory / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    package = Path(numpy.__file__).parent
    for name in (package.name, package.name + ".libs"):
        if (package.parent / name).exists():
            (site / name).symlink_to(package.parent / name)
    return python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--active-w", type=float, default=2.5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="footprint-"))
    arts = {}
    for name, shape in MODELS.items():
        torch.manual_seed(0)
        ex = export_graph(build_model(name, input_shape=shape, num_classes=10).eval(), shape)
        arts[name] = write_artifact(work / "arts", ex.graph, ex.arrays, {"model": name, "params": ex.params,
                                                                          "macs": ex.macs})
    request = {"op": "measure", "threads": 1, "warmup": 5, "min_runs": 50, "min_seconds": 0.5, "max_seconds": 5,
               "ci_target": None, "energy": {"source": "none"}, "thermal": {"settle_max_s": 0},
               "power": {"active_w": args.active_w}}
    results: dict[str, Any] = {}
    agent = Agent(sys.executable, work)
    bare = Agent(_numpy_only_python(work / "venv"), work)
    try:
        for name, art in arts.items():
            entry: dict[str, Any] = {"params": art.manifest["params"], "macs": art.manifest["macs"]}
            for backend in ("numpy", "onnxruntime"):
                replies = [agent.request({**request, "artifact": str(art.path), "backend": backend})
                           for _ in range(args.repeats)]
                entry[backend] = {f: statistics.median(r[f] for r in replies) for f in FIELDS}
                entry[backend]["version"] = replies[0]["backend_version"]
                entry[backend]["provider"] = replies[0]["provider"]
                energy = [r["energy"] for r in replies]
                entry[backend]["energy_estimated_mj"] = energy[0]["estimated_energy_per_inference_mj"]
                entry[backend]["energy_time_estimated_mj"] = statistics.median(
                    e["time_estimated_energy_per_inference_mj"] for e in energy)
            auto = bare.request({**request, "artifact": str(art.path)})
            entry["auto_without_onnxruntime"] = {"backend": auto["backend"], "note": auto["backend_note"],
                                                 **{f: auto[f] for f in FIELDS}}
            results[name] = entry
            print(name, json.dumps(entry, indent=None))
    finally:
        agent.close()
        bare.close()
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
           "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M"),
           "active_w": args.active_w, "repeats": args.repeats, "models": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
