"""How fast ``deepfleet compress lenet5 --data digits`` runs on a GPU against the CPU (issue 2).

Each run is the real CLI in a fresh process with an empty cache (base training, DeepIoT search,
fine-tuning, export), timed wall to wall:

* ``--devices``  one run per torch device, one after another (e.g. ``cuda,cpu``); a ``cpu`` run
                 can be pinned to ``--cpu-cores`` cores (taskset) to stand for the 2-core CI machine;
* ``--side-by-side N``  N runs at once on the first device (seeds 0..N-1), to show whether one run
                 leaves the GPU idle (host-bound) and what throughput several give;
* ``--threads T``  torch CPU threads per run (OMP_NUM_THREADS); torch's default is one per core,
                 which several runs side by side oversubscribe.

Prints and saves JSON (default ``benchmarks/results/compress_cuda.json``). Needs a GPU only for
the ``cuda`` runs; TF32 is disabled by ``deepfleet.compress`` itself, so ``extraction_error``
(masked vs extracted model, max abs difference) is the same exactness check as on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "compress_cuda.json"
sys.path.insert(0, str(HERE))
from _compress_cli import compress_batch  # noqa: E402


def _machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "gpu": gpu,
            "python": sys.version.split()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--cpu-cores", default="0,1", help="taskset core list for cpu runs ('' = all)")
    ap.add_argument("--side-by-side", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per run (default: torch's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    devices = args.devices.split(",")
    res: dict[str, Any] = {"machine": _machine(), "single": []}
    for dev in devices:
        res["single"].append(compress_batch(dev, [0], cores=args.cpu_cores if dev == "cpu" else None,
                                            threads=args.threads))
        print(json.dumps(res["single"][-1]), flush=True)
    if args.side_by_side > 1:
        dev = devices[0]
        res["side_by_side"] = compress_batch(dev, list(range(args.side_by_side)),
                                             cores=args.cpu_cores if dev == "cpu" else None, threads=args.threads)
        print(json.dumps(res["side_by_side"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, sort_keys=True))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
