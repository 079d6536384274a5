"""Markdown tables of ``compare.py``'s results (kept apart so the report can be re-made from the
JSON alone: ``python benchmarks/_compare_report.py benchmarks/results/compare.json``)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

LAYER_METHODS = ("deepiot", "deepiot+fp8", "l1", "magnitude", "dns", "dns-ff", "sparsesep", "lowrank", "fp8",
                 "kmeans4", "pq", "binary")
MODELS = ("lenet5", "deepsense", "bilstm")
NAMES = {"deepiot": "DeepIoT", "dns": "DyNS-Ext (dns)", "dns-ff": "DyNS (dns, recurrent off)",
         "sparsesep": "SparseSep", "magnitude": "magnitude (Han et al.)"}


# The tables' row order (rows of a part may come from several runs: --labels re-runs some).
ORDER = ("deepiot", "deepiot+fp8", "deepiot+fp4-nearest", "deepiot+fp4-stochastic", "deepiot+kmeans4", "l1",
         "magnitude", "dns", "dns-ff", "sparsesep", "dns+kmeans4", "lowrank", "fp8", "fp8+act8", "fp4-nearest",
         "fp4-stochastic", "kmeans4", "pq", "rq", "binary", "binary-stochastic", "binary+act")


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: ORDER.index(r["label"]) if r["label"] in ORDER else len(ORDER))


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f} %"


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| method | kept params | artifact bytes | of original | test acc | Δ test (pp) | val acc "
           "| torch ms | numpy ms | runtime max rel err | runtime = torch |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = rows[0]
    out.append(f"| original (fp32) | 100.00 % | {base['bytes_original']:,} | 100.00 % | {_pct(base['base_test'])} "
               f"| 0.00 | {_pct(base['base_val'])} | | | | |")
    others = sorted({r["base_test"] for r in rows} - {base["base_test"]})
    if others:  # rows re-run later (--labels) on a base model trained anew: each Δ is against its own
        out.insert(0, "Rows from runs on different trained originals (test accuracy "
                   + ", ".join(_pct(b) for b in [base["base_test"], *others]) + "); each Δ is against the "
                   "row's own original: " + "; ".join(
                       f"{_pct(b)}: " + ", ".join(r["label"] for r in rows if r["base_test"] == b)
                       for b in [base["base_test"], *others]) + ".\n")
    for r in rows:
        out.append(
            f"| {r['label']} | {_pct(r['kept_params'])} | {r['bytes']:,} | {_pct(r['bytes_ratio'], 3)} "
            f"| {_pct(r['test'])} | {100 * (r['test'] - r['base_test']):+.2f} | {_pct(r['val'])} "
            f"| {r['torch_ms_batch1']['min']:.3f} | {r['numpy_ms_batch1']['min']:.3f} | {r['runtime_max_rel_err']:.1e} "
            f"| {_pct(r['runtime_agreement'], 1)} |")
    return out


def _layers(rows: list[dict[str, Any]]) -> list[str]:
    """The DeepIoT paper's layout: one row per layer, per method kept units / params / bits."""
    by_label = {r["label"]: r for r in rows}
    methods = [m for m in LAYER_METHODS if m in by_label]
    if not methods:
        return []
    head = "| layer | hidden units | params | " + " | ".join(methods) + " |"
    out = [head, "|---|---:|---:|" + "---:|" * len(methods)]
    first = by_label[methods[0]]["layers"]
    for i, lay in enumerate(first):
        cells = []
        for m in methods:
            row = by_label[m]["layers"][i]
            bits = row.get("bits_per_weight", 32)
            nz = row.get("nonzero_after", row["params_after"])
            cells.append(f"{row['units_after']} · {_pct(nz / row['params_before'], 1)} · {bits:g} b")
        out.append(f"| {lay['name']} | {lay['units_before']} | {lay['params_before']:,} | " + " | ".join(cells) + " |")
    totals = [f"{_pct(by_label[m]['kept_params'])} · {by_label[m]['bytes']:,} B" for m in methods]
    out.append("| **total** | | {:,} | ".format(by_label[methods[0]]["params_before"]) + " | ".join(totals) + " |")
    out.append("")
    out.append("Cells: hidden units kept · nonzero parameters kept (of the layer's, BatchNorm folded away by "
               "quantisers) · storage bits per weight. Total: kept parameters · artifact bytes.")
    return out


EQUAL_SIZE = 1.5  # a rival keeping at most this multiple of DeepIoT's parameters counts as equal size


def _paper(rows: list[dict[str, Any]], model: str) -> list[str]:
    """DeepIoT against DyNS(-Ext) and SparseSep at the same parameter target, as in the paper."""
    by_label = {r["label"]: r for r in rows}
    labels = [lab for lab in NAMES if lab in by_label and not (model == "lenet5" and lab == "dns-ff")]
    if "deepiot" not in labels or len(labels) < 2:
        return []
    out = ["| method | kept params | artifact bytes | of original | MACs | test acc | Δ test (pp) | numpy ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for lab in labels:
        r = by_label[lab]
        out.append(f"| {NAMES[lab]} | {_pct(r['kept_params'])} | {r['bytes']:,} | {_pct(r['bytes_ratio'], 3)} "
                   f"| {_pct(r['macs_after'] / r['macs_before'], 1)} | {_pct(r['test'])} "
                   f"| {100 * (r['test'] - r['base_test']):+.2f} | {r['numpy_ms_batch1']['min']:.3f} |")
    d = by_label["deepiot"]
    rivals = [by_label[lab] for lab in ("dns", "dns-ff", "sparsesep") if lab in labels]
    # Equal size: a rival that could not get near the target (DyNS with its recurrent layers
    # left dense keeps most of a GRU/LSTM model) is compared apart, not as "the best".
    equal = [r for r in rivals if r["kept_params"] <= EQUAL_SIZE * d["kept_params"]]
    best = max(equal, key=lambda r: r["test"]) if equal else None
    if best is not None:
        ahead = d["test"] > best["test"]
        out += ["", f"At equal size (kept params within {EQUAL_SIZE}x of DeepIoT's), DeepIoT "
                f"{'is ahead of' if ahead else 'does not beat'} the best of DyNS(-Ext) and SparseSep here: "
                f"{_pct(d['test'])} at {_pct(d['kept_params'])} kept against {NAMES[best['label']]}'s "
                f"{_pct(best['test'])} at {_pct(best['kept_params'])} (test split, seed {d['seed']})."]
    for r in rivals:
        if r["label"] not in {e["label"] for e in equal}:
            out.append(f"{NAMES[r['label']]} could not reach the target: it kept {_pct(r['kept_params'])} "
                       f"({_pct(r['test'])}).")
    return out


def _seed_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """DeepIoT-chain rows of lenet5 from every seed: the lenet5 part and the rounding part,
    each (seed, label) once."""
    rows = {}
    for r in results.get("lenet5", []) + results.get("rounding", []):
        if "error" not in r and r["model"] == "lenet5" and r["label"].startswith("deepiot"):
            rows[(r["seed"], r["label"])] = r
    return list(rows.values())


def _over_seeds(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| method | seed | kept params | artifact bytes | of original | test acc (original) | test acc | Δ test (pp) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label in ("deepiot", "deepiot+fp8"):
        sel = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
        for r in sel:
            out.append(f"| {label} | {r['seed']} | {_pct(r['kept_params'])} | {r['bytes']:,} | {_pct(r['bytes_ratio'], 3)} "
                       f"| {_pct(r['base_test'])} | {_pct(r['test'])} | {100 * (r['test'] - r['base_test']):+.2f} |")
        if len(sel) > 1:
            drop = statistics.mean(100 * (r["test"] - r["base_test"]) for r in sel)
            ratio = statistics.mean(r["bytes_ratio"] for r in sel)
            out.append(f"| **{label} mean** | {len(sel)} seeds | | | {_pct(ratio, 3)} | | | **{drop:+.2f}** |")
    return out


def _is_rounding(r: dict[str, Any]) -> bool:
    """A row of the rounding study: ``deepiot+fp4-<rounding>-<training>``."""
    return r.get("label", "").startswith("deepiot+fp4-") and r["label"].count("-") >= 2


def _rounding(rows: list[dict[str, Any]]) -> list[str]:
    ref = {r["seed"]: r["test"] for r in rows if r.get("label") == "deepiot"}
    labels = sorted({r["label"] for r in rows if _is_rounding(r)})
    seeds = sorted(ref)
    out = ["| rounding | training | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | Δ vs DeepIoT fp32 (pp) |",
           "|---|---|" + "---:|" * (len(seeds) + 2),
           "| (DeepIoT fp32) | | " + " | ".join(_pct(ref[s]) for s in seeds) + f" | {_pct(statistics.mean(ref.values()))} | |"]
    names = {"none": "post-training", "ste": "STE fine-tuning", "low-precision": "low-precision training"}
    for label in labels:
        _, rounding, training = label.split("-", 2)
        acc = {r["seed"]: r["test"] for r in rows if r.get("label") == label}
        mean = statistics.mean(acc.values())
        drop = statistics.mean(acc[s] - ref[s] for s in acc if s in ref)
        out.append(f"| {rounding} | {names.get(training, training)} | "
                   + " | ".join(_pct(acc[s]) if s in acc else "" for s in seeds) + f" | {_pct(mean)} | {100 * drop:+.2f} |")
    return out


def write_markdown(results: dict[str, Any], plans: dict[str, Any], *, smoke: bool = False) -> str:
    lines = ["# Compressors compared", ""]
    if smoke:
        lines += ["**SMOKE RUN: tiny schedules, the numbers mean nothing.**", ""]
    lines += [
             "Generated by `benchmarks/compare.py`; numbers from `results/compare.json`. Accuracy on the "
             "test split (reported only: every decision inside a method reads the validation split). "
             "Artifact bytes are the three files on disk as `deepfleet compress` writes them. Kept params: "
             "parameters left by pruning (a quantiser stores every weight). Latency: torch on CPU with 1 "
             "thread and the device agent's numpy runtime, batch 1, fastest of >= 30 runs (medians in the JSON), measured "
             f"on a shared {results.get('machine', {}).get('cpu_count', '?')}-core machine while other jobs ran "
             "(indicative only; the load average at each measurement is in the JSON). Quantised weights run "
             "dequantised in both torch and numpy, so they do not change latency here. Pruned weights (magnitude, "
             "dns, dns-ff) are stored sparse (their nonzeros with relative indices: the artifact bytes shrink with "
             "the pruning) but decoded to dense tensors when the artifact is loaded, so the dense runtimes (torch, "
             "numpy, onnxruntime) gain no speed from them. SparseSep's fully connected layers run factorised "
             "in the numpy runtime and onnxruntime (x times the dictionary, then the sparse codes: MACs and numpy "
             "ms shrink), its recurrent matrices are stored factored and decoded dense; the torch column runs "
             "its dense product.", ""]
    cli = results.get("cli")
    if cli:
        lines += ["## Headline: `deepfleet compress lenet5 --data digits --method deepiot,fixedpoint --bits 8`", "",
                  f"artifact {cli['bytes_after']:,} B of the original's {cli['bytes_before']:,} B = "
                  f"**{_pct(cli['bytes_ratio'], 3)}**; test accuracy {_pct(cli['accuracy_before'])} → "
                  f"{_pct(cli['accuracy_after'])} (**{-cli['drop_pp']:+.2f} pp**); kept parameters "
                  f"{_pct(cli['kept_params'])}; {cli['wall_seconds']} s wall (cached base model).", ""]
        same = {r["label"]: r for r in results.get("lenet5", []) if "error" not in r and r["seed"] == 0}
        if {"deepiot", "deepiot+fp8"} <= set(same):
            a, b = same["deepiot"], same["deepiot+fp8"]
            lines += [f"In the benchmark's run of the same seed, DeepIoT alone scores {_pct(a['test'])} "
                      f"({100 * (a['test'] - a['base_test']):+.2f} pp) and the 8-bit step changes that by "
                      f"{100 * (b['test'] - a['test']):+.2f} pp while cutting the artifact from "
                      f"{a['bytes']:,} B to {b['bytes']:,} B. The seeds table below gives the mean.", ""]
    for model in MODELS:
        rows = _ordered([r for r in results.get(model, []) if "error" not in r and not _is_rounding(r)])
        errors = [r for r in results.get(model, []) if "error" in r]
        if not rows:
            continue
        plan = plans[model]
        lines += [f"## {model} / {plan['data']} (pruning target {_pct(plan['target'], 0)}, seed {rows[0]['seed']})", ""]
        if plan["deepiot"] or plan["finetune"]:
            lines += [f"Settings changed for time: DeepIoT {plan['deepiot']}, fine-tuning {plan['finetune']}.", ""]
        paper = _paper(rows, model)
        if paper:
            lines += ["DeepIoT against DyNS, DyNS-Ext and SparseSep at the same parameter target (the paper's "
                      "comparison):", ""] + paper + [""]
        lines += _summary(rows) + [""] + _layers(rows) + [""]
        lines += [f"- **{r['label']}** failed: {r['error']}" for r in errors]
    seeds = _seed_rows(results)
    if {r["label"] for r in seeds} >= {"deepiot", "deepiot+fp8"}:
        lines += ["## DeepIoT and DeepIoT + 8-bit fixed point on lenet5 / digits over seeds", ""]
        lines += _over_seeds(seeds) + [""]
    if any(_is_rounding(r) for r in seeds):
        lines += ["## DeepIoT + 4-bit fixed point on lenet5 / digits: nearest vs stochastic rounding", "",
                  "Test accuracy per seed. Post-training: quantise once. STE fine-tuning: float shadow "
                  "weights, quantised in the forward pass (a new stochastic draw every step), gradient "
                  "straight through. Low-precision training: the weights themselves stay on the 4-bit grid "
                  "and are re-rounded after every update (Gupta et al.'s setting).", ""]
        lines += _rounding(seeds) + [""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from compare import PLANS

    res = json.loads(Path(sys.argv[1]).read_text())
    print(write_markdown(res, PLANS))
