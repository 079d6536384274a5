"""The parts of ``compress.py`` about inputs as compression targets (``deepiot.inputs``).

* ``mlp-inputs``        mlp / digits at 3 % with ``inputs=features`` (pixels), seeds 0-2;
* ``mlp-inputs-kd``     the same, fine-tuned with distillation from the original (``kd_alpha``
                        0.7, the ingredient that took the mlp without input masking from 1.93 to
                        0.87 pp in part ``mlp-kd``);
* ``lenet5-inputs``     lenet5 / digits at 1 % and 0.5 %, inputs ``none`` and ``features``;
* ``deepsense-sensors`` deepsense / sensing at several targets, inputs ``none`` and ``sensors``:
                        each model exported and measured by the local agent (real rows), its
                        sensing energy from the sensor power below, ``energy_total`` read with
                        :mod:`deepfleet.metrics`; every sensor subset reached, and the front;
* ``sensor-subsets``    what the data supports: the original deepsense trained (base schedule,
                        per seed) on all sensors, on the accelerometer alone and on the gyroscope
                        alone; validation and test accuracy of each;
* ``timing-t100``       one ``deepfleet compress deepsense`` at defaults on 6-channel windows of
                        100 steps (the sensing generator at T = 100), empty cache, 2 threads,
                        with the load average before and after.

The test split is reported, never used to choose: the deepsense comparison picks by validation
accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Datasheet-style figures of the issue (a MEMS accelerometer draws tens of times less than a
# gyroscope, whose proof mass is driven all the time): milliwatts while sampling.
SENSOR_MW = {"accelerometer": 0.2, "gyroscope": 6.0}
DEEPSENSE_TARGETS = (0.02, 0.04, 0.06, 0.1)


def jobs(part: str, seeds: list[int]) -> list[dict[str, Any]]:
    if part == "mlp-inputs":
        return [{"part": part, "model": "mlp", "data": "digits", "target": 0.03, "seed": s,
                 "method": "deepiot+inputs", "search": {"inputs": "features"}} for s in seeds]
    if part == "mlp-inputs-kd":
        return [{"part": part, "model": "mlp", "data": "digits", "target": 0.03, "seed": s,
                 "method": "deepiot+inputs+kd-finetune", "search": {"inputs": "features"},
                 "finetune": {"kd_alpha": 0.7}} for s in seeds]
    if part == "lenet5-inputs":
        return [{"part": part, "model": "lenet5", "data": "digits", "target": t, "seed": s,
                 "method": f"deepiot{'+inputs' if inputs != 'none' else ''}@{t:.1%}", "search": {"inputs": inputs}}
                for t in (0.01, 0.005) for inputs in ("none", "features") for s in seeds]
    if part == "deepsense-sensors":
        return [{"part": part, "model": "deepsense", "data": "sensing", "target": t, "seed": s,
                 "method": f"deepiot{'+sensors' if inputs != 'none' else ''}@{t:.0%}",
                 "search": {"inputs": inputs}, "export": True}
                for t in DEEPSENSE_TARGETS for inputs in ("none", "sensors") for s in seeds]
    raise KeyError(part)


def inputs_row(res: Any) -> dict[str, Any] | None:
    """What a run kept of its inputs (DeepIoT's ``inputs`` info, trimmed)."""
    if res.inputs is None:
        return None
    keys = ("mode", "unit", "units", "units_kept", "inputs_total", "sensors_kept", "inputs_kept")
    return {k: res.inputs[k] for k in keys}


def export(spec: dict[str, Any], res: Any, data: Any, val: float, out: Path) -> str:
    """Write the run's artifact (manifest with the sensing keys); return its path."""
    from deepfleet.api import export_artifact
    from deepfleet.artifact import save_artifact

    _, files = export_artifact(res.model, model=spec["model"], data=data, seed=spec["seed"],
                               compressor={"methods": ["deepiot"], "target": spec["target"], "bench": spec["method"]},
                               val_accuracy=val, inputs=res.inputs)
    return str(save_artifact(out, files).path)


def export_original(model: str, data_name: str, seed: int, out: Path) -> dict[str, Any]:
    """The original model's artifact and accuracies (all sensors)."""
    import torch

    from deepfleet.api import BASE_TRAINING, _original, trained_base
    from deepfleet.artifact import save_artifact
    from deepfleet.compressors.training import accuracy
    from deepfleet.data import load_data

    data = load_data(data_name)
    base, _ = trained_base(model, data, seed=seed, cfg=BASE_TRAINING, device=torch.device("cpu"), progress=False)
    val, test = accuracy(base, data.X_val, data.y_val), accuracy(base, data.X_test, data.y_test)
    _, cand, files = _original(model, data, seed, base, val, test)
    return {"artifact": str(save_artifact(out, files).path), "val": val, "test": test,
            "params": cand.params, "macs": cand.macs}


def measure_energy(artifacts: list[str], root: Path) -> dict[str, dict[str, Any]]:
    """Measure each artifact on the local agent (a device whose sensors draw SENSOR_MW) and read
    the energy metrics from its row with deepfleet.metrics: {artifact: figures}."""
    import dataclasses

    from deepfleet import metrics
    from deepfleet.orchestrator.fleet import LOCAL_DEVICE, SensorPower
    from deepfleet.orchestrator.measure import MeasureSettings, measure_many

    device = dataclasses.replace(LOCAL_DEVICE, workdir=str(root / "work"),
                                 sensors=tuple(SensorPower(name=k, mw=v) for k, v in SENSOR_MW.items()))
    request = {"warmup": 2, "min_runs": 10, "max_runs": 50, "min_seconds": 0.2, "max_seconds": 5,
               "ci_target": None, "thermal": {"settle_max_s": 0}, "energy": {"source": "none"}}
    outcomes = measure_many([device], artifacts, results_root=root / "results",
                            settings=MeasureSettings(request=request, reference_every=10**6),
                            study="inputs-bench")
    out = {}
    for o in outcomes:
        if o.reference:
            continue
        row = o.row
        out[o.artifact] = {
            "error": o.error, "p50_ms": row.get("p50_ms"),
            **{m: metrics.row_value(m, row) for m in ("energy_estimated", "energy_sensing", "energy_total")},
            "sensing_basis": row.get("sensing_basis"),
        }
    return out


def front(points: list[dict[str, Any]], acc: str, energy: str) -> list[dict[str, Any]]:
    """The points no other point beats on both ``acc`` (higher) and ``energy`` (lower)."""
    keep = []
    for p in points:
        beaten = any(q[acc] >= p[acc] and q[energy] <= p[energy] and (q[acc] > p[acc] or q[energy] < p[energy])
                     for q in points)
        if not beaten:
            keep.append(p)
    return sorted(keep, key=lambda p: p[energy])


def deepsense_summary(rows: list[dict[str, Any]], original: dict[str, Any], energies: dict[str, Any]) -> dict[str, Any]:
    """Per run: sensors kept, accuracies, energies; the sensor subsets reached; the front; and
    the goal (<= 1 pp validation loss, total energy >= 40 % below the all-sensor compressed
    model at the same target)."""
    points = []
    for r in rows:
        e = energies.get(r["artifact"], {})
        points.append({
            "target": r["target"], "seed": r["seed"], "inputs": r["search"]["inputs"],
            "sensors_kept": (r.get("inputs") or {}).get("sensors_kept") or sorted(SENSOR_MW),
            "kept_params": r["kept_params"], "val": r["val"], "test": r["test"],
            "val_drop_pp": 100 * (original["val"] - r["val"]), "test_drop_pp": 100 * (original["test"] - r["test"]),
            "units": [lay["units_after"] for lay in r["layers"]],
            **{k: e.get(k) for k in ("energy_estimated", "energy_sensing", "energy_total", "p50_ms")},
        })
    subsets: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        subsets.setdefault("+".join(p["sensors_kept"]), []).append(p)
    goal = []
    for p in points:
        if p["inputs"] != "sensors":
            continue
        ref = [q for q in points if q["inputs"] == "none" and q["target"] == p["target"] and q["seed"] == p["seed"]]
        if not ref or p["energy_total"] is None or ref[0]["energy_total"] is None:
            continue
        saving = 1 - p["energy_total"] / ref[0]["energy_total"]
        goal.append({"target": p["target"], "seed": p["seed"], "sensors_kept": p["sensors_kept"],
                     "val_drop_pp": p["val_drop_pp"], "test_drop_pp": p["test_drop_pp"],
                     "energy_total_mj": p["energy_total"], "all_sensor_energy_total_mj": ref[0]["energy_total"],
                     "saving": saving, "meets_goal": p["val_drop_pp"] <= 1.0 and saving >= 0.4})
    usable = [p for p in points if p["energy_total"] is not None]
    return {
        "sensor_mw": SENSOR_MW, "original": original, "points": points,
        "subsets": {k: {"runs": len(v), "best_val": max(p["val"] for p in v),
                        "energy_total_mj_min": min((p["energy_total"] for p in v if p["energy_total"] is not None),
                                                   default=None)}
                    for k, v in subsets.items()},
        "front_val_vs_energy_total": front(usable, "val", "energy_total"),
        "goal": goal,
    }


def sensor_subsets(seeds: list[int]) -> dict[str, Any]:
    """The original deepsense trained on each sensor subset of ``sensing`` (the base schedule,
    cached like any base): the accuracy a model that reads only those sensors can reach."""
    import dataclasses

    import torch

    from deepfleet.api import BASE_TRAINING, trained_base
    from deepfleet.compressors.training import accuracy
    from deepfleet.data import load_data

    torch.set_num_threads(1)
    data = load_data("sensing")
    out: dict[str, Any] = {}
    for subset in (tuple(sorted(SENSOR_MW)), ("accelerometer",), ("gyroscope",)):
        idx = [i for i, s in enumerate(data.sensors or ()) if s in subset]
        sub = dataclasses.replace(data, X_train=data.X_train[:, idx], X_val=data.X_val[:, idx],
                                  X_test=data.X_test[:, idx], sensors=tuple(data.sensors[i] for i in idx),
                                  fingerprint=f"{data.fingerprint}:{'+'.join(subset)}" if len(idx) < len(data.sensors)
                                  else data.fingerprint)
        runs = []
        for seed in seeds:
            net, _ = trained_base("deepsense", sub, seed=seed, cfg=BASE_TRAINING, device=torch.device("cpu"),
                                  progress=False)
            runs.append({"seed": seed, "val": accuracy(net, sub.X_val, sub.y_val),
                         "test": accuracy(net, sub.X_test, sub.y_test),
                         "params": sum(p.numel() for p in net.parameters())})
        out["+".join(subset)] = {"channels": len(idx), "runs": runs,
                                 "val_mean": sum(r["val"] for r in runs) / len(runs),
                                 "test_mean": sum(r["test"] for r in runs) / len(runs)}
    return out


def timing_t100(workdir: Path) -> dict[str, Any]:
    """``deepfleet compress deepsense --data <T=100 npz>`` at defaults, empty cache, 2 threads."""
    npz = workdir / "sensing100.npz"
    code = (
        "import numpy as np\n"
        "from deepfleet.data import _sensing\n"
        "from deepfleet.data._dataset import stratified_split\n"
        "_sensing.T = 100\n"
        "X, y = _sensing.generate(difficulty=_sensing.DIFFICULTY)\n"
        "tr, va, te = stratified_split(y, (_sensing.N_VAL, _sensing.N_TEST), 0)\n"
        "m = X[tr].mean(axis=(0, 2), keepdims=True); s = X[tr].std(axis=(0, 2), keepdims=True)\n"
        "X = ((X - m) / s).astype(np.float32)\n"
        f"np.savez({str(npz)!r}, X_train=X[tr], y_train=y[tr], X_val=X[va], y_val=y[va], X_test=X[te],"
        " y_test=y[te], sensors=np.array(_sensing.SENSORS), sample_hz=np.float64(50.0))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    env = {**os.environ, "DEEPFLEET_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "deepfleet.cli", "compress", "deepsense", "--data", str(npz), "--json",
           "--device", "cpu", "--out", str(workdir / "out")]
    load_before = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"compress failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout)
    return {"wall_seconds": round(wall, 1), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "threads": 2, "cpu_count": os.cpu_count(), "samples_train": 6000 - 800 - 1200, "shape": [6, 100],
            **{k: r.get(k) for k in ("kept_params", "accuracy_before", "accuracy_after", "search_iterations",
                                     "base_cached", "base_seconds", "seconds")},
            "step_seconds": {s["method"]: s.get("seconds") for s in r.get("steps", [])}}


def run_timing() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        return timing_t100(Path(d))
