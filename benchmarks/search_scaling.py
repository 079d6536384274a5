"""Benchmark of the search (issue: Optuna over Ray with hardware in the loop). Prints and saves JSON.

Parts (``--parts``):

* ``throughput``   trials per minute with 1, 2 and 4 Ray workers (training only: objectives
                   accuracy and params, no device), and the speedup over one worker;
* ``utilisation``  busy / wall of the local device during a search whose training outpaces its
                   measurements (tiny trainings, long measurements);
* ``hypervolume``  hypervolume after N trials of the multi-objective TPE sampler vs random
                   sampling on the same budget, over 3 seeds (objectives: validation accuracy up,
                   parameters down), normalised by the box between the ideal point and each
                   reference point of ``REFERENCES``; every trial's point is saved.

Each search runs through the real driver (local Ray, SQLite storage, the local device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "search_scaling.json"


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both coordinates minimised) and bounded by ``ref``."""
    front: list[tuple[float, float]] = []
    best_y = ref[1]
    for x, y in sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1]):
        if y < best_y:  # sweeping x upwards, a point counts only if it lowers the best y
            front.append((x, y))
            best_y = y
    area = 0.0
    for i, (x, y) in enumerate(front):
        x_next = front[i + 1][0] if i + 1 < len(front) else ref[0]
        area += (x_next - x) * (ref[1] - y)
    return area


def _run(spec_raw: dict[str, Any], run_dir: Path, address: str | None = None) -> dict[str, Any]:
    from deepfleet.orchestrator.search_driver import Search
    from deepfleet.search._spec import parse_study

    spec = parse_study(spec_raw, "<benchmark>")
    t0 = time.perf_counter()
    summary = Search(spec, run_dir=run_dir, address=address, progress=False).run()
    summary["bench_wall_s"] = time.perf_counter() - t0
    return summary


def _ray_restart(num_cpus: int) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")


def throughput(trials: int) -> dict[str, Any]:
    out: dict[str, Any] = {"trials": trials, "workers": {}}
    for workers in (1, 2, 4):
        _ray_restart(workers)
        raw = {
            "name": f"throughput{workers}", "model": "lenet5", "data": "digits",
            "space": {"deepiot.target": {"low": 0.01, "high": 0.1, "log": True}, "deepiot.iterations": 200,
                      "deepiot.eval_every": 200},
            "training": {"finetune_epochs": 3}, "objectives": ["accuracy", "params"],
            "trials": trials, "parallelism": workers, "resources": {"cpu": 1},
        }
        with tempfile.TemporaryDirectory() as tmp:
            s = _run(raw, Path(tmp))
        out["workers"][str(workers)] = {
            "wall_s": round(s["bench_wall_s"], 1),
            "trials_per_min": round(60 * trials / s["bench_wall_s"], 2),
            "train_seconds_mean": s["train_seconds_mean"],
        }
    base = out["workers"]["1"]["trials_per_min"]
    for w in out["workers"].values():
        w["speedup"] = round(w["trials_per_min"] / base, 2)
    return out


def utilisation(trials: int) -> dict[str, Any]:
    _ray_restart(2)
    raw = {
        "name": "utilisation", "model": "mlp", "data": "digits",
        "space": {"deepiot.target": {"low": 0.02, "high": 0.2, "log": True}, "deepiot.iterations": 20,
                  "deepiot.eval_every": 20},
        "training": {"finetune_epochs": 1},
        "objectives": ["accuracy", {"metric": "latency_p50", "class": "local"}],
        # one training at a time leaves the other core to the device (the local device is
        # this machine); a training (~2.5 s) is still shorter than a measurement
        "trials": trials, "parallelism": 1,
        # long measurements: each holds the device ~3 s (max_runs lifted: the tiny mlp
        # would reach the default 10,000 runs in 0.1 s)
        "measure": {"min_runs": 20, "max_runs": 10**8, "min_seconds": 3.0, "max_seconds": 3.5},
    }
    with tempfile.TemporaryDirectory() as tmp:
        s = _run(raw, Path(tmp))
    dev = s["devices"]["local"]
    return {"trials": trials, "busy_s": dev["busy_s"], "utilisation": round(dev["utilisation"], 3),
            "leases": dev["leases"], "train_seconds_mean": s["train_seconds_mean"], "wall_s": round(s["bench_wall_s"], 1)}


def hypervolume(trials: int, seeds: list[int]) -> dict[str, Any]:
    import optuna

    _ray_restart(2)
    out: dict[str, Any] = {"trials": trials, "seeds": seeds, "runs": []}
    for seed in seeds:
        for sampler in ("tpe", "random"):
            raw = {
                "name": f"hv-{sampler}-{seed}", "model": "mlp", "data": "digits", "sampler": sampler,
                "space": {
                    "deepiot.target": {"low": 0.01, "high": 0.5, "log": True},
                    "deepiot.gamma": {"low": 0.1, "high": 0.9},
                    "deepiot.lr_compressor": {"low": 1e-4, "high": 3e-2, "log": True},
                    "deepiot.distill": {"low": 0.0, "high": 0.9},
                    "deepiot.iterations": 300, "deepiot.eval_every": 300,
                },
                "training": {"finetune_epochs": 5},
                "objectives": ["accuracy", "params"], "trials": trials, "parallelism": 2,
                "sampler_seed": seed,  # repetitions differ in the sampler; the base model is the same
            }
            with tempfile.TemporaryDirectory() as tmp:
                s = _run(raw, Path(tmp))
                study = optuna.load_study(study_name=raw["name"], storage=s["storage"])
                pts = [(-t.values[0], t.values[1]) for t in study.trials if t.values is not None]
            out["runs"].append({"seed": seed, "sampler": sampler, "points": pts,
                                **{f"hv_{name}": round(hypervolume_2d(pts, ref) / _area(ref), 5)
                                   for name, ref in REFERENCES.items()}})
    for name in REFERENCES:
        key = f"hv_{name}"
        for sampler in ("tpe", "random"):
            out[f"{key}_{sampler}_mean"] = round(statistics.mean(
                r[key] for r in out["runs"] if r["sampler"] == sampler), 5)
        out[f"{key}_tpe_wins_seeds"] = sum(
            1 for seed in seeds
            if next(r for r in out["runs"] if r["seed"] == seed and r["sampler"] == "tpe")[key]
            > next(r for r in out["runs"] if r["seed"] == seed and r["sampler"] == "random")[key]
        )
    return out


def _area(ref: tuple[float, float]) -> float:
    """The box between the ideal point (accuracy 1, no parameters) and ``ref``."""
    return (1.0 + ref[0]) * ref[1]


# Reference points (negated accuracy, parameters): ``whole`` = accuracy 0 and the original
# mlp's parameter count, where nearly any run covers ~96 % and differences drown; ``useful`` =
# the region a user of this search wants, accuracy >= 90 % at <= 10 % of the parameters.
REFERENCES = {"whole": (0.0, 266_610.0), "useful": (-0.90, 26_661.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="throughput,utilisation,hypervolume")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--util-trials", type=int, default=16)
    ap.add_argument("--hv-trials", type=int, default=40)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    parts = args.parts.split(",")
    if "throughput" in parts:
        results["throughput"] = throughput(args.trials)
    if "utilisation" in parts:
        results["utilisation"] = utilisation(args.util_trials)
    if "hypervolume" in parts:
        results["hypervolume"] = hypervolume(args.hv_trials, [int(s) for s in args.seeds.split(",")])
    results["machine"] = {"cpu_count": os.cpu_count(), "load_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    print(json.dumps({k: v for k, v in results.items() if k in parts}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
