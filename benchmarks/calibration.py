"""Calibration of compressed models (RDeepSense's reliability figures) on deepsense / sensing.

For each seed: the original, DeepIoT at 6 % of the parameters, and DeepIoT + 8-bit fixed point,
each before and after temperature scaling (T fitted on the validation split, deployed as the
artifact's ``temperature`` op), and DeepIoT followed by RDeepSense's fine-tuning (dropout 0.1,
loss 0.5 NLL + 0.5 MSE; its MC-dropout average over 20 passes beside the deployed single pass).
Reported on the test split (never used to fit anything): expected calibration error (15 bins),
NLL, Brier score, accuracy. The "+T" models are exported and their artifacts run in the numpy
runtime, whose ECE must equal torch's.

DeepIoT runs with ``compare.py``'s DeepSense plan (1500 search iterations, 10 fine-tuning epochs)
so that its rows match that table's. Writes ``results/calibration.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import save_case  # noqa: E402

OUT = HERE / "results" / "calibration.json"
PLAN = {"model": "deepsense", "data": "sensing", "target": 0.06, "deepiot": {"iterations": 1500, "distill": 0.7},
        "finetune": {"epochs": 10, "patience": 5}}
VARIANTS = ("original", "original+T", "deepiot", "deepiot+T", "deepiot+fp8", "deepiot+fp8+T",
            "deepiot+rdeepsense", "deepiot+rdeepsense+T")


def _figures(net: Any, data: Any) -> dict[str, Any]:
    from deepfleet.calibration import calibration
    from deepfleet.compressors.training import logits_of

    out = {}
    for split, X, y in (("val", data.X_val, data.y_val), ("test", data.X_test, data.y_test)):
        logits = logits_of(net, X).numpy()
        out[split] = {**calibration(logits, y), "accuracy": float((logits.argmax(1) == y).mean())}
    return out


def _runtime_ece(net: Any, data: Any, encodings: dict[str, Any], sparse: Any) -> float:
    """ECE on the test split of the exported artifact run by the numpy runtime."""
    from deepfleet.calibration import ece
    from deepfleet.compressors._export import export_graph
    from deepfleet.device_agent.runtime import Model

    ex = export_graph(net.cpu().eval(), data.input_shape, encodings, sparse=sparse)
    return ece(Model(ex.graph, ex.arrays).run(data.X_test), data.y_test)


def run_seed(seed: int, smoke: bool, plan: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from deepfleet.api import BASE_TRAINING, FINETUNE, trained_base
    from deepfleet.compressors import Context, make_compressor, run_pipeline
    from deepfleet.data import load_data

    t0 = time.perf_counter()
    data = load_data(plan["data"])
    base, cached = trained_base(plan["model"], data, seed=seed, cfg=BASE_TRAINING, device=torch.device("cpu"),
                                progress=False)
    finetune = dataclasses.replace(FINETUNE, **({"epochs": 1} if smoke else plan["finetune"]))
    ctx = Context(seed=seed, teacher=base, finetune=finetune)
    search = {"iterations": 30, "eval_every": 15} if smoke else {}
    deepiot = make_compressor("deepiot", {"target": plan["target"], **plan["deepiot"], **search})
    first = run_pipeline(base, data, [deepiot], ctx=ctx)
    settings = {"fixedpoint": {"bits": 8}, "rdeepsense": {"dropout": 0.1, "mse_weight": 0.5, "samples": 20}}
    # label -> (the label it continues, the method it adds); "+T" rows scale the very model before them
    chain = {"original": (None, None), "deepiot": (None, None), "deepiot+fp8": ("deepiot", "fixedpoint"),
             "deepiot+rdeepsense": ("deepiot", "rdeepsense")}
    done: dict[str, Any] = {"original": (base, {}, frozenset(), []), "deepiot": (first.model, {}, first.sparse, [])}
    rows: dict[str, Any] = {}
    for label in VARIANTS:
        scaled = label.endswith("+T")
        if scaled:
            start, encodings, sparse, steps = done[label[:-2]]
            res = run_pipeline(start, data, [make_compressor("temperature")], ctx=ctx)
            net, encodings = res.model, {**encodings, **res.encodings}  # scaling keeps the codes
            steps = steps + res.steps
        elif chain[label][0] is not None:
            prev, method = chain[label]
            res = run_pipeline(done[prev][0], data, [make_compressor(method, settings[method])], ctx=ctx)
            net, encodings, sparse, steps = res.model, res.encodings, res.sparse, res.steps
            done[label] = (net, encodings, sparse, steps)
        else:
            net, encodings, sparse, steps = done[label]
        row: dict[str, Any] = _figures(net, data)
        for step in steps:
            if step["method"] == "temperature":
                row["temperature"] = step["info"]["temperature"]
            if step["method"] == "rdeepsense":
                row["mc_dropout_val"] = step["info"]["mc"]
        if scaled:
            row["runtime_test_ece"] = _runtime_ece(net, data, encodings, sparse)
        rows[label] = row
        print(f"seed {seed} {label:22s} test ECE {100 * row['test']['ece']:.2f} pp  NLL {row['test']['nll']:.3f}  "
              f"acc {100 * row['test']['accuracy']:.2f} %", flush=True)
    return {"seed": seed, "base_cached": cached, "kept_params": first.kept_params(sum(p.numel() for p in base.parameters())),
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "loadavg_end": [round(v, 2) for v in os.getloadavg()]}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean test ECE (pp) per variant over seeds, and the figure: the compressed models' ECE
    after temperature scaling against the original's (before and after its own scaling)."""
    mean = {v: statistics.mean(100 * r["rows"][v]["test"]["ece"] for r in runs) for v in VARIANTS}
    acc = {v: statistics.mean(100 * r["rows"][v]["test"]["accuracy"] for r in runs) for v in VARIANTS}
    scaled = ("deepiot+T", "deepiot+fp8+T")
    return {
        "test_ece_pp": {v: round(x, 3) for v, x in mean.items()},
        "test_accuracy_pct": {v: round(x, 2) for v, x in acc.items()},
        "compressed_T_minus_original_pp": {v: round(mean[v] - mean["original"], 3) for v in scaled},
        "compressed_T_minus_original_T_pp": {v: round(mean[v] - mean["original+T"], 3) for v in scaled},
        "within_1pp_of_original": all(abs(mean[v] - mean["original"]) <= 1.0 for v in scaled),
        "seeds": [r["seed"] for r in runs],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--smoke", action="store_true", help="tiny schedules: check that the script runs")
    ap.add_argument("--model", default=PLAN["model"], help="another zoo model (e.g. for a smoke run)")
    ap.add_argument("--data", default=PLAN["data"])
    args = ap.parse_args()
    plan = {**PLAN, "model": args.model, "data": args.data}
    load = [round(v, 2) for v in os.getloadavg()]
    runs = [run_seed(int(s), args.smoke, plan) for s in args.seeds.split(",")]
    entry = {"plan": plan, "runs": runs, "summary": summarise(runs), "loadavg_start": load, "smoke": args.smoke}
    save_case(args.out, f"{plan['model']}-{plan['data']}" + ("-smoke" if args.smoke else ""), entry)
    print(entry["summary"])


if __name__ == "__main__":
    main()
