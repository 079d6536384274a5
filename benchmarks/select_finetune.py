"""Choose the fine-tuning recipe without the test split. Prints and saves JSON.

Fine-tuning settings are decisions, so they must not be chosen on the test split (whose figures
the compress benchmark reports), and the validation split cannot judge them either: it already
picks each run's checkpoint, and 200 images resolve 0.5 pp only as one image. This script holds
out ``--holdout`` images of the *training* split as a development set (a different slice per
seed), trains the base model on the rest, runs the DeepIoT search once per seed and fine-tunes
the extracted model with every recipe, scoring each by the development set's accuracy drop
against the base model. The real test split is never loaded into the runs.

    python benchmarks/select_finetune.py --model mlp --data digits --target 0.03
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _results import save_case

HERE = Path(__file__).resolve().parent

# name -> overrides of deepfleet.api.FINETUNE (every rule named, whatever the default is now)
RECIPES: dict[str, dict[str, Any]] = {
    "select accuracy": {"select": "accuracy", "shift": 0},
    "select accuracy+loss": {"select": "accuracy+loss", "shift": 0},
    "select loss": {"select": "loss", "shift": 0},
    "select accuracy, weight decay 1e-4": {"select": "accuracy", "weight_decay": 1e-4, "shift": 0},
    "select accuracy, 120 epochs": {"select": "accuracy", "epochs": 120, "patience": 40, "shift": 0},
    "kd 0.7 + select accuracy+loss": {"kd_alpha": 0.7, "select": "accuracy+loss", "shift": 0},
    # translated copies of the training images (TrainConfig.shift), with and without distillation
    "shift 2 + select accuracy+loss": {"select": "accuracy+loss", "shift": 2},
    "shift 2 + kd 0.7 + select accuracy+loss": {"kd_alpha": 0.7, "select": "accuracy+loss", "shift": 2},
    # pure distillation (the labels are the original's outputs only), on the training images and
    # on their translated copies too: "function matching" (Beyer et al., 2022)
    "kd 1.0 + select accuracy+loss": {"kd_alpha": 1.0, "select": "accuracy+loss", "shift": 0},
    "shift 2 + kd 1.0 + select accuracy+loss": {"kd_alpha": 1.0, "select": "accuracy+loss", "shift": 2},
    "shift 2 + kd 1.0, 120 epochs": {"kd_alpha": 1.0, "select": "accuracy+loss", "shift": 2, "epochs": 120,
                                     "patience": 40},
}
DEFAULT_SEEDS = "0,1,2,3,4,5,6,7,8,9,10,11"


def dev_split(data: Any, holdout: int, seed: int) -> Any:
    """``data`` with ``holdout`` training images (drawn by ``seed``) as its test split."""
    import numpy as np

    from deepfleet.data import Dataset
    from deepfleet.data._dataset import fingerprint

    order = np.random.default_rng(1000 + seed).permutation(len(data.y_train))
    dev, train = np.sort(order[:holdout]), np.sort(order[holdout:])
    arrays = (data.X_train[train], data.y_train[train], data.X_val, data.y_val,
              data.X_train[dev], data.y_train[dev])
    return Dataset(f"{data.name}-dev{seed}", *arrays, num_classes=data.num_classes,
                   description=f"development split of {data.name}", fingerprint=fingerprint(*arrays))


def merge_recipes(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the recipes that only ``old`` ran kept (their summaries and runs): a case's
    results accumulate over invocations that each run some recipes on the same seeds."""
    if old is None:
        return new
    kept = [name for name in old["summary"] if name not in new["summary"]]
    return new | {"summary": {**{n: old["summary"][n] for n in kept}, **new["summary"]},
                  "runs": [r for r in old["runs"] if r["recipe"] in kept] + new["runs"]}


def _job(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    from deepfleet.api import BASE_TRAINING, FINETUNE, trained_base
    from deepfleet.compressors._deepiot import DeepIoTConfig
    from deepfleet.compressors._pipeline import deepiot_compress
    from deepfleet.compressors.training import accuracy, train
    from deepfleet.data import load_data

    seed = spec["seed"]
    data = dev_split(load_data(spec["data"]), spec["holdout"], seed)
    base_cfg = dataclasses.replace(BASE_TRAINING, select=spec["base_select"], shift=spec["base_shift"])
    base, _ = trained_base(spec["model"], data, seed=seed, cfg=base_cfg, device=torch.device("cpu"), progress=False)
    base_dev = accuracy(base, data.X_test, data.y_test)
    t0 = time.perf_counter()
    no_ft = dataclasses.replace(FINETUNE, epochs=0)
    res = deepiot_compress(base, data, DeepIoTConfig(target=spec["target"]), no_ft, seed=seed, progress=False)
    search_s = time.perf_counter() - t0
    rows = []
    for name, over in ((n, RECIPES[n]) for n in spec["recipes"]):
        t1 = time.perf_counter()
        model, hist = train(copy.deepcopy(res.model), data, dataclasses.replace(FINETUNE, **over), seed=seed,
                            teacher=base, progress=False)
        dev_acc = accuracy(model, data.X_test, data.y_test)
        rows.append({"recipe": name, "seed": seed, "kept_params": res.kept_params, "base_dev": base_dev,
                     "dev": dev_acc, "drop_pp": 100 * (base_dev - dev_acc),
                     "val": accuracy(model, data.X_val, data.y_val), "epochs_run": len(hist["loss"]),
                     "search_seconds": round(search_s, 1), "finetune_seconds": round(time.perf_counter() - t1, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--target", type=float, default=0.03)
    ap.add_argument("--holdout", type=int, default=300)
    ap.add_argument("--base-select", default="accuracy+loss", help="checkpoint rule of the base training")
    ap.add_argument("--recipes", default=";".join(RECIPES), help="';'-separated recipe names (default: all)")
    ap.add_argument("--base-shift", type=int, default=0, help="TrainConfig.shift of the base training")
    ap.add_argument("--seeds", default=DEFAULT_SEEDS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "select_finetune.json")
    args = ap.parse_args()
    recipes = args.recipes.split(";")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    jobs = [{"recipes": recipes, "model": args.model, "data": args.data, "target": args.target, "holdout": args.holdout,
             "base_select": args.base_select, "base_shift": args.base_shift, "seed": int(s)}
            for s in args.seeds.split(",")]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = [r for rs in pool.map(_job, jobs) for r in rs]
    summary = {
        name: {"drop_pp_mean": statistics.mean(r["drop_pp"] for r in rs),
               "drop_pp_per_seed": [round(r["drop_pp"], 2) for r in rs],
               "val_mean": statistics.mean(r["val"] for r in rs),
               "epochs_run_mean": statistics.mean(r["epochs_run"] for r in rs)}
        for name in recipes for rs in [[r for r in rows if r["recipe"] == name]]
    }
    key = f"{args.model}/{args.data}@{args.target}, base selected by {args.base_select}"
    key += f", base shift {args.base_shift}" if args.base_shift else ""
    key += f", seeds {args.seeds}" if args.seeds != DEFAULT_SEEDS else ""
    print(json.dumps(summary, indent=1))
    save_case(args.out, key, {"case": vars(args) | {"out": str(args.out)}, "summary": summary, "runs": rows},
              merge=merge_recipes)


if __name__ == "__main__":
    main()
