"""Benchmark of the DeepIoT compressor (issue: compressor-critic). Prints and saves JSON.

Parts (``--parts``, comma list; results are merged into the JSON file so parts can run apart):

* ``lenet5``    lenet5 / digits at 1 % of the parameters, per seed (mean over seeds reported);
* ``ablation``  which ingredient helped on lenet5 / digits: the paper's schedule vs the
                size-aware target schedule, distillation in the search and in fine-tuning;
* ``mlp``       mlp / digits at 3 %, against structured L1 pruning (uniform ratio, same fine-tuning);
* ``mlp-kd``    mlp / digits at 3 % with distillation from the original while fine-tuning
                (kd_alpha 0.7), the ingredient that helped lenet5 most in the ablation;
* ``mlp-sweep`` mlp / digits at 4, 5, 6, 8 and 10 %: the size at which the mlp meets the 0.5 pp bar
                (its 784-input first layer is never masked, so at 3 % it keeps only 8-9 units);
* ``deepsense`` deepsense / sensing at 6 %, against the same L1 baseline;
* ``bilstm``    bilstm / sensing at 10 %;
* ``deepsense-user`` deepsense / sensing-user (DeepSense-UserID) at 2 % (the paper kept 1.13 %),
                `deepfleet compress`'s DeepIoT schedule (3000 iterations);
* ``deepsense-user-kd`` the same, fine-tuned for 60 epochs without the MAC budget (which allows
                DeepSense about 16) and with distillation from the original (``kd_alpha`` 0.7);
* ``deepsense-user-long`` the same with the search's full 3000 iterations (no MAC budget, which
                allows DeepSense about 1500); ``deepsense-user-6000`` with 6000;
                ``deepsense-user-ft200`` 6000 and fine-tuned for 200 epochs (patience 50),
                ``deepsense-user-ft400`` for 400 (patience 100), ``deepsense-user-ft400-loss``
                the same keeping the epoch of lowest validation loss (``select`` ``loss``);
                ``deepsense-user-ft400-full`` and ``-ft800-full`` for 400 and 800 without early
                stopping (patience = epochs: the cosine schedule decays to its end),
                ``deepsense-user-ft400-last`` the same keeping the final epoch (``select`` ``last``),
                ``-ft800-last`` for 800, ``-ft1600-last`` for 1600, ``-ft400-kd1`` for 400 on the
                original's outputs alone (``kd_alpha`` 1: no labels), ``-ft400-last-via4`` the
                400-epoch recipe in two stages (searched to 4 % and fine-tuned, that model
                searched again to 2 % and fine-tuned: iterative pruning), ``-ft400-last-s12000``
                the 400-epoch recipe after a search of 12000 iterations instead of 6000
                (``-ft800-last-s12000`` 800 epochs after it: the same cached search),
                ``deepsense-user-ft400-views`` that with consistent distillation on 8 noisy views of
                the training windows (``views`` 8, ``jitter`` 0.1: the teacher's outputs per view);
                ``deepsense-user-size`` 6000 at 3 and 4 % kept (where this zoo DeepSense meets
                the 0.5 pp bar); ``deepsense-user-scratch`` the control: a DeepSense of width 4
                (1,489 parameters, 2.0 %) trained from scratch for 150 epochs, alone and with
                distillation from the original (``kd_alpha`` 0.7);
* ``deepear``   deepear / audio (DeepEar's 2.3 M-parameter DNN) at 5 %, the same schedule;
* ``latency``   torch CPU latency (1 thread) of lenet5: original, DeepIoT-extracted and
                magnitude-pruned to the same parameter count, batch 64 and batch 1;
* ``timing``    wall time of one ``deepfleet compress lenet5 --data digits`` with an empty cache;
* ``mlp-inputs``, ``mlp-inputs-kd``, ``lenet5-inputs``, ``deepsense-sensors``, ``sensor-subsets``,
                ``timing-t100``: inputs as
                compression targets (``deepiot.inputs``), see ``_inputs_bench.py``.

Jobs run in ``--workers`` processes, one torch thread each, on ``--device`` (default cpu; on
cuda TF32 is off, as in ``deepfleet compress``, and runs are not bit-reproducible).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _inputs_bench as inputs_bench  # noqa: E402

INPUT_PARTS = ("mlp-inputs", "mlp-inputs-kd", "lenet5-inputs", "deepsense-sensors")
SINGLE_PARTS = ("latency", "timing", "timing-t100", "sensor-subsets")  # one function each, not jobs
DEFAULT_OUT = HERE / "results" / "compress.json"

# name -> (DeepIoT config overrides, fine-tuning overrides). The paper's schedule (+0.025 every
# 500 iterations up to 0.825) is compressed into the same 3000-iteration budget: every 230.
PAPER = {"schedule": "paper", "distill": 0.0, "tau_every": 230}
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper": (PAPER, {}),
    "paper+kd-finetune": (PAPER, {"kd_alpha": 0.7}),
    "target": ({"distill": 0.0}, {}),
    "target+kd-search": ({}, {}),  # the default
    "target+kd-search+kd-finetune": ({}, {"kd_alpha": 0.7}),
}

# deepsense-user fine-tuning variants (beyond kd_alpha 0.7, work None), each on the 6000 search
SEARCH_6000 = {"work": None, "iterations": 6000}
SEARCH_12000 = {**SEARCH_6000, "iterations": 12000}
# the recipe: 400 epochs to the end of the cosine schedule, the final epoch kept
RECIPE_400 = {"epochs": 400, "patience": 400, "select": "last"}
RECIPE_800 = {**RECIPE_400, "epochs": 800, "patience": 800}  # the same to the end of 800 epochs
USER_FINETUNE = {"deepsense-user-ft200": {"epochs": 200, "patience": 50},
                 "deepsense-user-ft400": {"epochs": 400, "patience": 100},
                 "deepsense-user-ft400-loss": {"epochs": 400, "patience": 100, "select": "loss"},
                 "deepsense-user-ft400-full": {"epochs": 400, "patience": 400},
                 "deepsense-user-ft800-full": {"epochs": 800, "patience": 800},
                 "deepsense-user-ft400-last": RECIPE_400,
                 "deepsense-user-ft800-last": RECIPE_800,
                 "deepsense-user-ft1600-last": {"epochs": 1600, "patience": 1600, "select": "last"},
                 "deepsense-user-ft400-kd1": {"epochs": 400, "patience": 400, "select": "last", "kd_alpha": 1.0},
                 "deepsense-user-ft400-views": {"epochs": 400, "patience": 400, "select": "last", "views": 8,
                                                "jitter": 0.1},
                 "deepsense-user-ft400-last-via4": RECIPE_400,
                 "deepsense-user-ft400-last-s12000": RECIPE_400,
                 "deepsense-user-ft800-last-s12000": RECIPE_800}
# deepsense-user variants compressed in two stages: searched to this kept fraction first and
# fine-tuned, then that model searched again down to the figure's 2 % (iterative pruning)
USER_VIA = {"deepsense-user-ft400-last-via4": 0.04}
# deepsense-user variants -> the search's settings (work None: no MAC budget on the iterations)
USER_SEARCH: dict[str, dict[str, Any]] = {"deepsense-user-kd": {},
                                          "deepsense-user-long": {"work": None, "iterations": 3000},
                                          **dict.fromkeys(("deepsense-user-6000", "deepsense-user-size",
                                                           *USER_FINETUNE), SEARCH_6000),
                                          # after the keys above, so that these two replace their 6000 search
                                          **dict.fromkeys(("deepsense-user-ft400-last-s12000",
                                                           "deepsense-user-ft800-last-s12000"),
                                                          SEARCH_12000)}
USER_TARGETS = {"deepsense-user-size": (0.03, 0.04)}  # default: the figure's 2 %

# part -> (model, data, kept fraction of the parameters)
FIGURES = {"deepsense-user": ("deepsense", "sensing-user", 0.02), "deepear": ("deepear", "audio", 0.05)}


def _job(spec: dict[str, Any]) -> dict[str, Any]:
    """One compression run in a fresh process (1 torch thread), TF32 off as in ``deepfleet
    compress`` (the extraction check needs exact float32 matmuls on GPUs)."""
    import torch

    from deepfleet.api import _exact_float32

    torch.set_num_threads(1)
    with _exact_float32():
        return _compress(spec)


def _compress(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from deepfleet.api import BASE_TRAINING, FINETUNE, trained_base
    from deepfleet.compressors._cost import cost_model, kept_fraction
    from deepfleet.compressors._deepiot import DeepIoTConfig
    from deepfleet.compressors._extract import extract
    from deepfleet.compressors._graph import analyse
    from deepfleet.compressors._l1 import uniform_l1_keep
    from deepfleet.compressors._pipeline import _count, deepiot_compress, layer_table
    from deepfleet.compressors.training import (
        TrainConfig,
        accuracy,
        fit_budget,
        macs_per_sample,
        train,
    )
    from deepfleet.data import load_data

    t0 = time.perf_counter()
    data = load_data(spec["data"])
    dev = torch.device(spec.get("device", "cpu"))
    base, _ = trained_base(spec["model"], data, seed=spec["seed"], cfg=BASE_TRAINING, device=dev, progress=False)
    ft = dataclasses.replace(FINETUNE, **spec.get("finetune", {}))
    # the fine-tuning budget in the original's MACs per sample, as compress_model applies it
    ft = fit_budget(ft, len(data.y_train), macs_per_sample(base, torch.as_tensor(data.X_train[:2])))
    row: dict[str, Any] = {**spec, "base_test": accuracy(base, data.X_test, data.y_test),
                           "base_val": accuracy(base, data.X_val, data.y_val)}
    if spec["part"] in USER_SEARCH:  # fine-tuning variants of one deterministic search: searched once
        small, fields = _searched({**spec, "target": spec.get("via", spec["target"])}, base, data)
        model, _ = train(small, data, ft, seed=spec["seed"], teacher=base, desc="fine-tune", progress=False)
        kept = fields.pop("kept_params")
        if "via" in spec:
            model, kept, fields = _second_stage(spec, base, model, kept, fields, data, ft)
        row.update(fields)
    elif spec["method"].startswith("deepiot"):
        cfg = DeepIoTConfig(target=spec["target"], **spec.get("search", {}))
        res = deepiot_compress(base, data, cfg, ft, seed=spec["seed"], progress=False)
        model, kept = res.model, res.kept_params
        row.update(search_iterations=res.search.iterations, val_after_search=res.val_accuracy_search,
                   extraction_error=res.extraction_error, layers=layer_table(res.structure, base, model),
                   inputs=inputs_bench.inputs_row(res))
        if spec.get("export"):
            row["artifact"] = inputs_bench.export(spec, res, data, accuracy(model, data.X_val, data.y_val),
                                                  Path(spec["export_dir"]))
    elif spec["method"].startswith("scratch"):  # the same size, trained from scratch: the control
        from deepfleet.models._zoo import DeepSense  # the zoo's factory has no width argument

        torch.manual_seed(spec["seed"])
        model = DeepSense(data.input_shape, data.num_classes, width=spec["width"]).to(dev)
        model, _ = train(model, data, TrainConfig(**spec["train"]), seed=spec["seed"], teacher=base,
                         progress=False)
        model.eval()
        kept = _count(model) / _count(base)
        row.update(layers=[])
    else:  # structured L1 pruning with a uniform ratio per layer, then the same fine-tuning
        st = analyse(base, torch.as_tensor(data.X_train[:2]))
        cm = cost_model(st)
        keep, ratio = uniform_l1_keep(st, st.graph_module, cm, spec["target"])
        model = extract(st, st.graph_module, keep)
        model, _ = train(model, data, ft, seed=spec["seed"], teacher=base, progress=False)
        kept = float(kept_fraction(cm, [torch.as_tensor(k, dtype=torch.float64) for k in keep], "params"))
        row.update(ratio=ratio, layers=layer_table(st, base, model))
    row.update(
        kept_params=kept,
        test=accuracy(model, data.X_test, data.y_test),
        val=accuracy(model, data.X_val, data.y_val),
        seconds=round(time.perf_counter() - t0, 1),
        train_select=ft.select,  # the checkpoint rule (rows without it predate the rule: "accuracy")
    )
    row["drop_pp"] = 100 * (row["base_test"] - row["test"])
    return row


def _searched(spec: dict[str, Any], base: Any, data: Any) -> tuple[Any, dict[str, Any]]:
    """DeepIoT's search and extraction of ``spec`` without fine-tuning: (the extracted model, its
    row fields). Kept in ``$DEEPFLEET_CACHE/bench-compress/<key>.pt`` (key: the spec's search,
    target, seed, data and the base's weights) with torch's RNG state after the search, which is
    restored on every use: fine-tuning then starts exactly where ``deepiot_compress`` starts it
    (its dropout draws from that state), so a cached run is the uncached run."""
    import hashlib

    import torch

    from deepfleet._files import cache_dir
    from deepfleet.compressors._deepiot import DeepIoTConfig
    from deepfleet.compressors._extract import extract
    from deepfleet.compressors._masked import masked_model
    from deepfleet.compressors._pipeline import analyse_inputs, deepiot_compress, layer_table
    from deepfleet.compressors.training import TrainConfig

    cfg = DeepIoTConfig(target=spec["target"], **spec.get("search", {}))
    h = hashlib.sha256(json.dumps([spec["model"], spec["data"], spec["seed"], spec["target"], spec.get("search", {})],
                                  sort_keys=True).encode())
    for t in base.state_dict().values():
        h.update(t.detach().cpu().numpy().tobytes())
    path = cache_dir() / "bench-compress" / f"{h.hexdigest()[:20]}.pt"
    if not path.exists():
        res = deepiot_compress(base, data, cfg, TrainConfig(epochs=0), seed=spec["seed"], progress=False)
        fields = {"search_iterations": res.search.iterations, "val_after_search": res.val_accuracy_search,
                  "extraction_error": res.extraction_error, "kept_params": res.kept_params,
                  "layers": layer_table(res.structure, base, res.model), "inputs": inputs_bench.inputs_row(res)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"keep": res.keep, "weights": res.model.state_dict(), "fields": fields,
                    "rng": torch.get_rng_state()}, tmp)
        tmp.replace(path)
    saved = torch.load(path, weights_only=False)
    # an extracted model does not pickle (a traced graph): rebuilt from the kept units instead
    example = torch.as_tensor(data.X_train[:2])
    structure = analyse_inputs(base, data, cfg.inputs, example)
    small = extract(structure, masked_model(structure)[0], saved["keep"])
    small.load_state_dict(saved["weights"])
    torch.set_rng_state(saved["rng"])
    return small, dict(saved["fields"])


def _second_stage(spec: dict[str, Any], base: Any, mid: Any, kept_mid: float, fields: dict[str, Any], data: Any,
                  ft: Any) -> tuple[Any, float, dict[str, Any]]:
    """Iterative DeepIoT: ``mid`` (``base`` searched to ``spec["via"]`` and fine-tuned, ``kept_mid``
    of its parameters) searched again down to ``spec["target"]`` of ``base``'s parameters (that
    search distils from ``mid``, as every search does from its model), then fine-tuned with
    ``ft`` from ``base`` as the one-stage recipe is. Returns (the model, its kept fraction of
    ``base``'s parameters, its row fields; the first stage's under ``stage1``)."""
    from deepfleet.compressors._deepiot import DeepIoTConfig
    from deepfleet.compressors._pipeline import _count, deepiot_compress, layer_table
    from deepfleet.compressors.training import TrainConfig, accuracy, train

    stage1 = {**fields, "kept_params": kept_mid, "val_after_finetune": accuracy(mid, data.X_val, data.y_val)}
    mid = _layered(mid, data)
    cfg = DeepIoTConfig(target=spec["target"] / kept_mid, **spec["search"])
    res = deepiot_compress(mid, data, cfg, TrainConfig(epochs=0), seed=spec["seed"], progress=False)
    model, _ = train(res.model, data, ft, seed=spec["seed"], teacher=base, desc="fine-tune", progress=False)
    # counted, not multiplied: both stages' fractions are of their own model
    kept = _count(model) / _count(base)
    return model, kept, {"search_iterations": res.search.iterations, "val_after_search": res.val_accuracy_search,
                         "extraction_error": res.extraction_error, "layers": layer_table(res.structure, mid, model),
                         "inputs": None, "stage1": stage1, "kept_params_product": kept_mid * res.kept_params}


def _layered(small: Any, data: Any) -> Any:
    """An extracted deepsense as an equivalent module that the analyser reads: its GRU layers,
    of different widths, sit in a ``StackedRNN`` (one leaf the analyser does not take apart),
    and come out here as one ``nn.GRU`` per layer; the rest is the same modules, copied.
    Raises if the two disagree on the validation windows."""
    import copy

    import torch
    from torch import nn

    def get(name: str) -> Any:
        return copy.deepcopy(small.get_submodule(name))

    class Layered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(
                nn.Sequential(get(f"branches.{b}.0"), get(f"branches.{b}.1"), nn.ReLU(),
                              get(f"branches.{b}.3"), get(f"branches.{b}.4"), nn.ReLU()) for b in range(2))
            self.merge = nn.Sequential(get("merge.0"), get("merge.1"), nn.ReLU())
            self.grus = nn.ModuleList(get("gru").layers)
            self.fc = get("fc")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            parts = [branch(x[:, 3 * i : 3 * (i + 1)]) for i, branch in enumerate(self.branches)]
            x = self.merge(torch.cat(parts, 1)).transpose(1, 2)
            for gru in self.grus:
                x, _ = gru(x)
            return self.fc(x.mean(1))

    if data.X_train.shape[1] != 6:
        raise ValueError(f"_layered reads deepsense on two 3-axis sensors, not {data.X_train.shape[1]} channels")
    layered = Layered().eval()
    small.eval()
    with torch.no_grad():
        x = torch.as_tensor(data.X_val)
        err = float((layered(x) - small(x)).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"the layered copy differs from the extracted model by {err}")
    return layered


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    inputs = [r.get("inputs") for r in rows]
    extra = {"inputs_kept_per_seed": [f"{i['units_kept']}/{i['units']} {i['unit']}s" for i in inputs]} \
        if all(inputs) else {}
    return {
        **extra,
        "runs": len(rows),
        "kept_params_pct_mean": 100 * statistics.mean(r["kept_params"] for r in rows),
        "base_test_mean": statistics.mean(r["base_test"] for r in rows),
        "test_mean": statistics.mean(r["test"] for r in rows),
        "drop_pp_mean": statistics.mean(r["drop_pp"] for r in rows),
        "drop_pp_per_seed": [round(r["drop_pp"], 2) for r in rows],
        "units_per_seed": [[lay["units_after"] for lay in r["layers"]] for r in rows],
        "seconds_mean": statistics.mean(r["seconds"] for r in rows),
    }


def _latency_part() -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from deepfleet.api import BASE_TRAINING, FINETUNE, trained_base
    from deepfleet.compressors._deepiot import DeepIoTConfig
    from deepfleet.compressors._magnitude import magnitude_prune
    from deepfleet.compressors._pipeline import deepiot_compress
    from deepfleet.data import load_data

    data = load_data("digits")
    base, _ = trained_base("lenet5", data, seed=0, cfg=BASE_TRAINING, device=torch.device("cpu"), progress=False)
    res = deepiot_compress(base, data, DeepIoTConfig(target=0.01), FINETUNE, seed=0, progress=False)
    small = res.model.eval()
    pruned = magnitude_prune(base, res.kept_params).eval()
    nonzero = sum(int((p != 0).sum()) for p in pruned.parameters())
    out: dict[str, Any] = {"threads": 1, "kept_params": res.kept_params, "magnitude_nonzero_params": nonzero}
    for batch in (64, 1):
        x = torch.as_tensor(data.X_test[:batch])
        times = {}
        for name, model in (("original", base.eval()), ("deepiot", small), ("magnitude", pruned)):
            times[name] = _median_ms(model, x)
        out[f"batch{batch}"] = {
            **{f"{k}_ms": round(v, 4) for k, v in times.items()},
            "deepiot_ratio": round(times["deepiot"] / times["original"], 4),
            "magnitude_ratio": round(times["magnitude"] / times["original"], 4),
        }
    return out


def _median_ms(model: Any, x: Any, seconds: float = 2.0) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(20):
            model(x)
        samples = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(samples) < 50:
            t = time.perf_counter()
            model(x)
            samples.append(time.perf_counter() - t)
    return 1000 * statistics.median(samples)


def _timing_part() -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from _compress_cli import compress_batch

    batch = compress_batch("cpu", [0])
    r = batch["runs"][0]
    return {"wall_seconds": batch["wall_seconds"], "cpu_count": os.cpu_count(), "kept_params": r["kept_params"],
            "accuracy_before": r["accuracy_before"], "accuracy_after": r["accuracy_after"]}


def _run_jobs(jobs: list[dict[str, Any]], workers: int, partial: Path) -> list[dict[str, Any]]:
    """Every job's row in job order; each row is also appended to ``partial`` as it finishes, so
    that a run stopped early (a time limit) keeps what it measured. ``partial`` is removed at
    the end."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows: list[Any] = [None] * len(jobs)
    with ProcessPoolExecutor(workers) as pool, partial.open("a") as log:
        futures = {pool.submit(_job, j): i for i, j in enumerate(jobs)}
        for fut in as_completed(futures):
            rows[futures[fut]] = fut.result()
            log.write(json.dumps(rows[futures[fut]], sort_keys=True) + "\n")
            log.flush()
    partial.unlink()
    return rows


def _jobs(part: str, seeds: list[int]) -> list[dict[str, Any]]:
    if part in INPUT_PARTS:
        return inputs_bench.jobs(part, seeds)
    if part == "lenet5":
        return [{"part": part, "model": "lenet5", "data": "digits", "target": 0.01, "seed": s, "method": "deepiot"} for s in seeds]
    if part == "ablation":
        return [
            {"part": part, "variant": v, "model": "lenet5", "data": "digits", "target": 0.01, "seed": s,
             "method": "deepiot", "search": search, "finetune": ft}
            for v, (search, ft) in VARIANTS.items() for s in seeds
        ]
    if part == "mlp-kd":
        return [{"part": part, "model": "mlp", "data": "digits", "target": 0.03, "seed": s,
                 "method": "deepiot+kd-finetune", "finetune": {"kd_alpha": 0.7}} for s in seeds]
    if part == "mlp-sweep":
        return [{"part": part, "model": "mlp", "data": "digits", "target": t, "seed": s, "method": f"deepiot@{t:.0%}"}
                for t in (0.04, 0.05, 0.06, 0.08, 0.10) for s in seeds]
    if part in FIGURES:  # the data sets' own figures: DeepIoT as `deepfleet compress` runs it
        model, data, target = FIGURES[part]
        return [{"part": part, "model": model, "data": data, "target": target, "seed": s, "method": "deepiot"}
                for s in seeds]
    if part in USER_SEARCH:  # fine-tuned 60 epochs (no MAC budget) with distillation, the search as named
        model, data, target = FIGURES["deepsense-user"]
        search, ft = USER_SEARCH[part], {"kd_alpha": 0.7, "work": None, **USER_FINETUNE.get(part, {})}
        method = (f"deepiot+kd-finetune-{ft.get('epochs', 60)}" + (f"-{ft['select']}" if "select" in ft else "")
                  + ("-full" if ft.get("patience") == ft.get("epochs") else "")
                  + (f"-views{ft['views']}-jitter{ft['jitter']}" if ft.get("views") else "")
                  + (f"-kd{ft['kd_alpha']}" if ft["kd_alpha"] != 0.7 else "")
                  + (f"+search-{search['iterations']}" if search else ""))
        via = {"via": USER_VIA[part]} if part in USER_VIA else {}
        method += f"+via{USER_VIA[part]:.0%}" if via else ""
        return [{"part": part, "model": model, "data": data, "target": t, "seed": s, "search": search,
                 "method": method + (f"@{t:.0%}" if part in USER_TARGETS else ""), "finetune": ft, **via}
                for t in USER_TARGETS.get(part, (target,)) for s in seeds]
    if part == "deepsense-user-scratch":
        model, data, _ = FIGURES["deepsense-user"]
        return [{"part": part, "model": model, "data": data, "target": 0.02, "seed": s, "width": 4,
                 "method": f"scratch-width4{'+kd' if kd else ''}-150",
                 "train": {"epochs": 150, "patience": 150, "kd_alpha": kd}}
                for kd in (0.0, 0.7) for s in seeds]
    targets = {"mlp": ("digits", 0.03), "deepsense": ("sensing", 0.06), "bilstm": ("sensing", 0.10)}
    data, target = targets[part]
    methods = ["deepiot", "l1-uniform"] if part in ("mlp", "deepsense") else ["deepiot"]
    iters = {"deepsense": 1500, "bilstm": 1500}.get(part)
    return [
        {"part": part, "model": part, "data": data, "target": target, "seed": s, "method": m,
         **({"search": {"iterations": iters}} if iters and m == "deepiot" else {})}
        for m in methods for s in seeds
    ]


def _deepsense_sensors(rows: list[dict[str, Any]], original: Any) -> dict[str, Any]:
    """Measure every exported deepsense model (and the original) on the local agent; summarise."""
    with tempfile.TemporaryDirectory() as d:
        energies = inputs_bench.measure_energy([r["artifact"] for r in rows] + [original["artifact"]], Path(d))
    original.update({k: energies[original["artifact"]].get(k) for k in ("energy_estimated", "energy_sensing", "energy_total")})
    out = inputs_bench.deepsense_summary(rows, original, energies)
    out["runs"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="lenet5,ablation,mlp,deepsense,bilstm,latency,timing")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--device", default="cpu", help="torch device of every job: cpu, cuda, cuda:N")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    jobs = [j for p in parts if p not in SINGLE_PARTS for j in _jobs(p, seeds)]
    export_dir = Path(tempfile.gettempdir()) / "deepfleet-bench-inputs"  # artifacts measured, not kept
    for j in jobs:
        j["device"] = args.device
        if j.get("export"):
            j["export_dir"] = str(export_dir)
    original = None
    if "deepsense-sensors" in parts:  # trained (or found) once, before the jobs that all need it
        original = inputs_bench.export_original("deepsense", "sensing", seeds[0], export_dir)
    if jobs:
        rows = _run_jobs(jobs, args.workers, args.out.with_suffix(".partial.jsonl"))
        for part in {j["part"] for j in jobs}:
            part_rows = [r for r in rows if r["part"] == part]
            key = "variant" if part == "ablation" else "method"
            if part == "deepsense-sensors":
                results[part] = _deepsense_sensors(part_rows, original)
                continue
            results[part] = {
                name: {"summary": _summarise([r for r in part_rows if r[key] == name]),
                       "runs": [r for r in part_rows if r[key] == name]}
                for name in dict.fromkeys(r[key] for r in part_rows)
            }
    if "latency" in parts:
        results["latency"] = _latency_part()
    if "timing" in parts:
        results["timing"] = _timing_part()
    if "timing-t100" in parts:
        results["timing-t100"] = inputs_bench.run_timing()
    if "sensor-subsets" in parts:
        results["sensor-subsets"] = inputs_bench.sensor_subsets(seeds)
    results["machine"] = {"cpu_count": os.cpu_count(), "torch_threads_per_job": 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    for part in parts:
        if part in results:
            block = results[part]
            if part in SINGLE_PARTS:
                summary = block
            elif part == "deepsense-sensors":
                summary = {k: block[k] for k in ("subsets", "goal", "front_val_vs_energy_total")}
            else:
                summary = {k: v["summary"] for k, v in block.items()}
            print(f"== {part}\n{json.dumps(summary, indent=1)}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
