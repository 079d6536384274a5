"""What the mlp / digits bar would need: fewer inputs to the first layer. Prints and saves JSON.

DESIGN.md §4 never masks the input layer, so at 3 % of LeNet-300-100's parameters on 28 x 28
digits the first layer (784 inputs, 785 parameters per unit) keeps only 8-9 units. This
*prototype outside the design* asks what keeping fewer input pixels would buy: it drops pixels
from the data (``grid``: every second row and column, 196 of 784; ``norm``: the ``--pixels``
pixels whose first-layer weight columns have the largest L2 norm), copies the base model's
weights for the kept pixels into an mlp of that input size, fine-tunes it, and runs the DeepIoT
search and fine-tuning at the *same* absolute budget (3 % of the 784-input original). Scored like
``select_finetune.py``: held-out training images per seed, never the test split. Compare with
that script's default recipe on the same seeds (same base models, same searches).

    python benchmarks/mlp_input_subsample.py --select grid --seeds 0,1,2,3,4,5,6,7,8,9,10,11
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from _results import save_case
from select_finetune import dev_split

HERE = Path(__file__).resolve().parent


def _kept_pixels(base: Any, select: str, pixels: int) -> Any:
    import numpy as np
    import torch

    if select == "grid":
        return np.array([r * 28 + c for r in range(0, 28, 2) for c in range(0, 28, 2)])
    norms = torch.linalg.vector_norm(base.net[1].weight.detach(), dim=0)
    return np.sort(norms.argsort(descending=True)[:pixels].numpy())


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from deepfleet.api import BASE_TRAINING, FINETUNE, trained_base
    from deepfleet.compressors._deepiot import DeepIoTConfig
    from deepfleet.compressors._pipeline import deepiot_compress
    from deepfleet.compressors.training import accuracy, train
    from deepfleet.data import Dataset, load_data
    from deepfleet.models._zoo import MLP

    seed = spec["seed"]
    data = dev_split(load_data("digits"), spec["holdout"], seed)
    base, _ = trained_base("mlp", data, seed=seed, cfg=BASE_TRAINING, device=torch.device("cpu"), progress=False)
    base_dev = accuracy(base, data.X_test, data.y_test)
    full = sum(p.numel() for p in base.parameters())
    kept = _kept_pixels(base, spec["select"], spec["pixels"])

    def cut(X: Any) -> Any:
        return X.reshape(len(X), 1, -1)[:, :, kept].copy()

    small_data = Dataset(f"digits-{len(kept)}px", cut(data.X_train), data.y_train, cut(data.X_val), data.y_val,
                         cut(data.X_test), data.y_test, num_classes=data.num_classes,
                         description="digits, some pixels only", fingerprint=f"{data.fingerprint}-{spec['select']}-{len(kept)}")
    small = MLP(len(kept), data.num_classes)
    state = copy.deepcopy(base.state_dict())
    state["net.1.weight"] = state["net.1.weight"][:, kept]
    small.load_state_dict(state)
    small, _ = train(small, small_data, FINETUNE, seed=seed, progress=False)
    small_params = sum(p.numel() for p in small.parameters())
    res = deepiot_compress(small.eval(), small_data, DeepIoTConfig(target=spec["target"] * full / small_params),
                           FINETUNE, seed=seed, progress=False)
    dev = accuracy(res.model, small_data.X_test, small_data.y_test)
    return {"seed": seed, "select": spec["select"], "pixels": len(kept), "base_dev": base_dev,
            "fewer_pixels_dev": accuracy(small, small_data.X_test, small_data.y_test),
            "kept_params_of_original": res.kept_params * small_params / full,
            "units": [m.out_features for m in res.model.modules() if isinstance(m, torch.nn.Linear)],
            "dev": dev, "drop_pp": 100 * (base_dev - dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--select", choices=("grid", "norm"), default="grid")
    ap.add_argument("--pixels", type=int, default=150, help="pixels kept by --select norm")
    ap.add_argument("--target", type=float, default=0.03, help="budget as a fraction of the 784-input mlp")
    ap.add_argument("--holdout", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9,10,11")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "mlp_input_subsample.json")
    args = ap.parse_args()
    jobs = [{"select": args.select, "pixels": args.pixels, "target": args.target, "holdout": args.holdout,
             "seed": int(s)} for s in args.seeds.split(",")]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(_job, jobs))
    summary = {"drop_pp_mean": statistics.mean(r["drop_pp"] for r in rows),
               "drop_pp_per_seed": [round(r["drop_pp"], 2) for r in rows],
               "fewer_pixels_drop_pp_mean": statistics.mean(100 * (r["base_dev"] - r["fewer_pixels_dev"]) for r in rows),
               "units_per_seed": [r["units"] for r in rows]}
    print(json.dumps(summary, indent=1))
    save_case(args.out, f"{args.select} {rows[0]['pixels']} pixels @{args.target}, seeds {args.seeds}",
              {"case": vars(args) | {"out": str(args.out)}, "summary": summary, "runs": rows})


if __name__ == "__main__":
    main()
