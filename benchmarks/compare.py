"""Compare the compressors (issue: the field's other compressors and quantisers).

For lenet5 / digits, deepsense / sensing and bilstm / sensing, every method (and DeepIoT
followed by the quantisers) is run on the same trained base model and measured the same way
(``--labels`` runs only some rows and keeps the others from earlier runs; bilstm runs the
paper's comparison only: DeepIoT, DyNS-Ext, DyNS, SparseSep, magnitude):

* kept parameters (nonzero parameters after / parameters of the original);
* artifact bytes on disk (graph.json + weights.npz + manifest.json, written exactly as
  ``deepfleet compress`` writes them) and their ratio to the original's artifact;
* test accuracy (reported only: every decision inside a method reads the validation split);
* torch CPU latency (1 thread, batch 1, median) and the numpy runtime's latency;
* the numpy runtime against torch on the test split: max relative error, prediction agreement.

DyNS is ``dns`` with ``recurrent`` off (Guo et al.: fully connected and convolution layers only;
label ``dns-ff``), DyNS-Ext ``dns`` with it on (label ``dns``; the same as DyNS on lenet5).
SparseSep (``sparsesep``) gets the same parameter target as the others.

Part ``rounding`` repeats DeepIoT, DeepIoT + 8-bit fixed point and DeepIoT + 4-bit fixed point
over more seeds (the first seed's rows come from the lenet5 part), 4 bits with nearest and
stochastic rounding, each post-training, with STE fine-tuning and with low-precision training. Part
``cli`` runs ``deepfleet compress lenet5 --data digits --method deepiot,fixedpoint --bits 8``
end to end. Writes ``results/compare.json`` and ``results/compare.md`` (the per-layer tables in
the layout of the DeepIoT paper). Jobs run in ``--workers`` processes with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _compare_report import write_markdown  # noqa: E402

OUT = HERE / "results"

# model -> data, pruning target, DeepIoT overrides, fine-tuning overrides. DeepSense trains a
# masked GRU step by step and fine-tunes a GRU over 64 steps: 1500 DeepIoT iterations and 10
# fine-tuning epochs keep it to about an hour of CPU for all methods (the machine is shared).
PLANS: dict[str, dict[str, Any]] = {
    "lenet5": {"data": "digits", "target": 0.01, "deepiot": {}, "finetune": {}},
    "deepsense": {"data": "sensing", "target": 0.06, "deepiot": {"iterations": 1500},
                  "finetune": {"epochs": 10, "patience": 5}},
    "bilstm": {"data": "sensing", "target": 0.10, "deepiot": {"iterations": 1500},
               "finetune": {"epochs": 10, "patience": 5}},
}
MODELS = tuple(PLANS)
RECURRENT = ("deepsense", "bilstm")  # models where DyNS and DyNS-Ext differ
PAPER_ROWS = ("deepiot", "dns", "dns-ff", "sparsesep", "magnitude")  # the DeepIoT paper's comparison

# label -> pipeline of (method, settings); "deepiot" first means: after the shared DeepIoT run.
FP4 = {f"fp4-{r}-{t}": [("fixedpoint", {"bits": 4, "rounding": r, "training": t})]
       for r in ("nearest", "stochastic") for t in ("none", "ste", "low-precision")}


def rows(target: float) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    return {
        "deepiot": [("deepiot", {})],
        "deepiot+fp8": [("deepiot", {}), ("fixedpoint", {"bits": 8})],
        "deepiot+fp4-nearest": [("deepiot", {}), ("fixedpoint", {"bits": 4})],
        "deepiot+fp4-stochastic": [("deepiot", {}), ("fixedpoint", {"bits": 4, "rounding": "stochastic"})],
        "deepiot+kmeans4": [("deepiot", {}), ("kmeans", {"bits": 4})],
        "l1": [("l1", {"target": target})],
        "magnitude": [("magnitude", {"target": target})],
        "dns": [("dns", {"target": target})],
        "dns-ff": [("dns", {"target": target, "recurrent": False})],
        "sparsesep": [("sparsesep", {"target": target})],
        "dns+kmeans4": [("dns", {"target": target}), ("kmeans", {"bits": 4})],
        "lowrank": [("lowrank", {})],
        "fp8": [("fixedpoint", {"bits": 8})],
        "fp8+act8": [("fixedpoint", {"bits": 8, "act_bits": 8})],
        "fp4-nearest": [("fixedpoint", {"bits": 4})],
        "fp4-stochastic": [("fixedpoint", {"bits": 4, "rounding": "stochastic"})],
        "kmeans4": [("kmeans", {"bits": 4})],
        "pq": [("pq", {"bits": 4, "dim": 4})],
        "rq": [("rq", {"bits": 8, "dim": 4, "stages": 2})],
        "binary": [("binary", {})],
        "binary-stochastic": [("binary", {"stochastic": True})],
        "binary+act": [("binary", {"activations": True})],
    }


def _plan(model: str, smoke: bool) -> dict[str, Any]:
    """The model's plan; ``smoke``: a few iterations and one epoch, to check the script runs."""
    plan = PLANS[model]
    if smoke:
        plan = {**plan, "deepiot": {"iterations": 30, "eval_every": 15}, "finetune": {"epochs": 1}}
    return plan


def _setup(model: str, seed: int, smoke: bool) -> tuple[Any, Any, Any, Any]:
    import dataclasses

    import torch

    torch.set_num_threads(1)
    from deepfleet.api import BASE_TRAINING, FINETUNE, trained_base
    from deepfleet.compressors import Context
    from deepfleet.data import load_data

    plan = _plan(model, smoke)
    data = load_data(plan["data"])
    base, _ = trained_base(model, data, seed=seed, cfg=BASE_TRAINING, device=torch.device("cpu"), progress=False)
    ctx = Context(seed=seed, teacher=base, finetune=dataclasses.replace(FINETUNE, **plan["finetune"]))
    return data, base, ctx, plan


def _compressor(plan: dict[str, Any], method: str, settings: dict[str, Any]) -> Any:
    from deepfleet.compressors import make_compressor

    if method == "deepiot":  # the API's DeepIoT: distillation in the search, the plan's budget
        settings = {"target": plan["target"], "distill": 0.7, **plan["deepiot"], **settings}
    return make_compressor(method, settings)


def _latency_ms(fn: Any, x: Any, seconds: float = 1.0) -> dict[str, float]:
    """Median and fastest of >= 30 timed runs after 10 warm-up runs. The machine is shared,
    so the fastest run is the steadier estimate of the undisturbed latency."""
    for _ in range(10):
        fn(x)
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 30:
        t = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - t)
    return {"median": round(1000 * statistics.median(samples), 4), "min": round(1000 * min(samples), 4)}


def _measure(label: str, common: dict[str, Any], result: Any, *, comps: list[Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    import dataclasses

    import numpy as np
    import torch

    from deepfleet.api import export_artifact
    from deepfleet.compressors._graph import analyse
    from deepfleet.compressors._pipeline import layer_table
    from deepfleet.compressors.training import accuracy
    from deepfleet.device_agent.runtime import Model

    data, base, model, seed = common["data"], common["base"], common["model"], common["seed"]
    small, encodings = result.model.eval(), result.encodings
    kept_params = type(result)(model=small, steps=steps).kept_params(sum(p.numel() for p in base.parameters()))
    settings = {"methods": [c.name for c in comps],
                "steps": [{"method": c.name, "settings": dataclasses.asdict(c.config)} for c in comps]}
    val = accuracy(small, data.X_val, data.y_val)
    ex, art = export_artifact(small, model=model, data=data, seed=seed, compressor=settings, val_accuracy=val,
                              encodings=encodings, sparse=result.sparse)
    ex_base, art_base = export_artifact(base, model=model, data=data, seed=seed, compressor={"methods": []},
                                        val_accuracy=accuracy(base, data.X_val, data.y_val))
    nbytes, nbytes_base = art.bytes, art_base.bytes
    runtime = Model(ex.graph, ex.arrays)
    X = data.X_test
    with torch.no_grad():
        ref = small(torch.as_tensor(X)).numpy()
    out = runtime.run(X)
    structure = analyse(base, torch.as_tensor(data.X_train[:2]))
    x1 = torch.as_tensor(X[:1])
    with torch.inference_mode():
        torch_ms = _latency_ms(small, x1)
    return {
        "label": label, "seed": seed, "methods": settings["methods"],
        "params_before": sum(p.numel() for p in base.parameters()),
        "params_after": sum(p.numel() for p in small.parameters()),
        "kept_params": kept_params,
        "nonzero_params": sum(int((p != 0).sum()) for p in small.parameters()) / sum(p.numel() for p in base.parameters()),
        "macs_before": ex_base.macs, "macs_after": ex.macs,
        "bytes": nbytes, "bytes_original": nbytes_base, "bytes_ratio": nbytes / nbytes_base,
        "test": accuracy(small, data.X_test, data.y_test), "val": val,
        "base_test": accuracy(base, data.X_test, data.y_test), "base_val": accuracy(base, data.X_val, data.y_val),
        "runtime_test": float((out.argmax(1) == data.y_test).mean()),
        "runtime_max_rel_err": float(np.abs(out - ref).max() / np.abs(ref).max()),
        "runtime_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
        "torch_ms_batch1": torch_ms, "numpy_ms_batch1": _latency_ms(runtime.run, X[:1]),
        "loadavg": [round(v, 2) for v in os.getloadavg()],  # the machine is shared: latencies are indicative
        "layers": layer_table(structure, base, small, encodings=encodings, sparse=result.sparse),
        "weights_encodings": sorted({t["encoding"] for t in ex.graph["tensors"].values()}),
        "ops": sorted({o["op"] for o in ex.graph["ops"]}),
        "steps": steps,
        "seconds": round(sum(s["seconds"] for s in steps), 1),
    }


def _chain_job(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """DeepIoT once, then every follow-up of ``spec['labels']`` on its result."""
    from deepfleet.compressors import run_pipeline

    model, seed = spec["model"], spec["seed"]
    data, base, ctx, plan = _setup(model, seed, spec["smoke"])
    common = {"data": data, "base": base, "model": model, "seed": seed}
    deepiot = _compressor(plan, "deepiot", {})
    first = run_pipeline(base, data, [deepiot], ctx=ctx)
    out = []
    for label, pipeline in spec["labels"].items():
        if label == "deepiot":
            out.append(_measure(label, common, first, comps=[deepiot], steps=first.steps))
            continue
        comps = [_compressor(plan, m, s) for m, s in pipeline if m != "deepiot"]
        rest = run_pipeline(first.model, data, comps, ctx=ctx)
        out.append(_measure(label, common, rest, comps=[deepiot, *comps], steps=first.steps + rest.steps))
    return out


def _single_job(spec: dict[str, Any]) -> list[dict[str, Any]]:
    from deepfleet.compressors import run_pipeline

    model, seed = spec["model"], spec["seed"]
    data, base, ctx, plan = _setup(model, seed, spec["smoke"])
    comps = [_compressor(plan, m, s) for m, s in spec["pipeline"]]
    res = run_pipeline(base, data, comps, ctx=ctx)
    common = {"data": data, "base": base, "model": model, "seed": seed}
    return [_measure(spec["label"], common, res, comps=comps, steps=res.steps)]


def _run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        rows_ = (_chain_job if spec["kind"] == "chain" else _single_job)(spec)
    except Exception as exc:  # a failed method is a result too: report it, keep the others
        import traceback

        return [{"label": spec.get("label", "chain"), "part": spec["part"], "model": spec["model"],
                 "seed": spec["seed"], "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}]
    for r in rows_:
        r.update(part=spec["part"], model=spec["model"])
    return rows_


def _jobs(parts: list[str], seeds: list[int], smoke: bool, labels: list[str] | None = None) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for model in MODELS:
        if model not in parts:
            continue
        table = rows(PLANS[model]["target"])
        if model not in RECURRENT:
            table.pop("dns-ff")
        if model == "bilstm" or labels:
            table = {k: v for k, v in table.items() if k in (labels or PAPER_ROWS)}
        chain = {k: v for k, v in table.items() if v[0][0] == "deepiot"}
        if "rounding" in parts and model == "lenet5":
            chain.update({f"deepiot+{k}": [("deepiot", {}), *v] for k, v in FP4.items()})
        if chain:
            jobs.append({"kind": "chain", "part": model, "model": model, "seed": seeds[0], "labels": chain})
        jobs += [{"kind": "single", "part": model, "model": model, "seed": seeds[0], "label": k, "pipeline": v}
                 for k, v in table.items() if v[0][0] != "deepiot"]
    if "rounding" in parts:  # more seeds of DeepIoT, DeepIoT + 8 bits and the 4-bit study
        rounding = {f"deepiot+{k}": [("deepiot", {}), *v] for k, v in FP4.items()}
        rounding["deepiot"] = [("deepiot", {})]
        rounding["deepiot+fp8"] = [("deepiot", {}), ("fixedpoint", {"bits": 8})]
        jobs += [{"kind": "chain", "part": "rounding", "model": "lenet5", "seed": s, "labels": rounding}
                 for s in (seeds[1:] if "lenet5" in parts else seeds)]
    for j in jobs:
        j["smoke"] = smoke
    # The headline chain first, then the long DeepSense chain (so that it does not finish last),
    # the rounding seeds, then the single methods.
    def order(j: dict[str, Any]) -> int:
        if j["kind"] == "chain":
            return {"lenet5": 0, "deepsense": 1, "bilstm": 2}.get(j["part"], 3)
        return {"lenet5": 4, "deepsense": 5}.get(j["model"], 6)

    return sorted(jobs, key=order)


def _cli_part() -> dict[str, Any]:
    """The headline figure from the command line itself (cached base model, default settings)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "deepfleet.cli", "compress", "lenet5", "--data", "digits", "--json",
             "--method", "deepiot,fixedpoint", "--bits", "8", "--out", tmp],
            capture_output=True, text=True, env=env, check=True,
        )
        wall = time.perf_counter() - t
    r = json.loads(proc.stdout)
    keep = ("methods", "params_before", "params_after", "kept_params", "accuracy_before", "accuracy_after",
            "val_accuracy_before", "val_accuracy_after", "bytes_before", "bytes_after", "layers")
    return {**{k: r[k] for k in keep}, "bytes_ratio": r["bytes_after"] / r["bytes_before"],
            "drop_pp": 100 * (r["accuracy_before"] - r["accuracy_after"]), "wall_seconds": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="lenet5,deepsense,rounding,cli")
    ap.add_argument("--seeds", default="0,1,2", help="first seed for the method tables, all for 'rounding'")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--smoke", action="store_true", help="tiny schedules: check that the script runs")
    ap.add_argument("--labels", default=None,
                    help="only these rows (comma list, e.g. deepiot,dns,sparsesep); the parts' other rows stay")
    args = ap.parse_args()
    parts = args.parts.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    labels = args.labels.split(",") if args.labels else None
    path = args.out / "compare.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    jobs = _jobs(parts, seeds, args.smoke, labels)
    t0 = time.perf_counter()
    for part in dict.fromkeys(j["part"] for j in jobs):
        again = {(lab, j["seed"]) for j in jobs if j["part"] == part
                 for lab in (j["labels"] if j["kind"] == "chain" else [j["label"]])}
        results[part] = [] if labels is None else [
            r for r in results.get(part, []) if (r.get("label"), r.get("seed")) not in again]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(_run, j) for j in jobs]
        for fut in as_completed(futures):  # save as results arrive: a killed run keeps them
            for r in fut.result():
                results[r["part"]].append(r)
            _save(args.out, results, parts, args)
    if "cli" in parts:
        results["cli"] = _cli_part()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    _save(args.out, results, parts, args)
    print((args.out / "compare.md").read_text())


def _save(out: Path, results: dict[str, Any], parts: list[str], args: argparse.Namespace) -> None:
    results["machine"] = {"cpu_count": os.cpu_count(), "torch_threads_per_job": 1, "workers": args.workers,
                          "note": "latencies measured while the other worker (and other users) ran"}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "compare.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, out / "compare.json")
    try:
        report = write_markdown(results, PLANS, smoke=args.smoke)
    except Exception as exc:  # partial results may not fill every table yet; the JSON is what counts
        report = f"(report not made from partial results: {type(exc).__name__}: {exc})\n"
    (out / "compare.md").write_text(report)


if __name__ == "__main__":
    main()
