"""The report's tables, as pure functions of frames (no I/O, no formatting).

Every table is a DataFrame with machine-friendly column names that say their unit and, for
energy, their kind (``energy_measured_mj``, ``energy_simulated_mj``, ``energy_estimated_mj``,
``energy_time_estimated_mj``): the CSV files hold exactly these frames, and the HTML/Markdown
only format them. Every latency table has a ``backend`` column (the runtime that measured) and
never pools rows of different runtimes into one figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from deepfleet.device_agent.format import compressor_label
from deepfleet.report._analysis import COLUMNS, ENERGY_COLUMNS, ok_rows
from deepfleet.report._stats import (
    box_stats,
    coefficient_of_variation,
    kendall_tau_b,
    reduction_pct,
    spearman_rho,
)

__all__ = [
    "agents_table",
    "artifacts_table",
    "devices_table",
    "drift_table",
    "energy_sources_table",
    "failures_table",
    "latency_table",
    "layers_table",
    "rank_agreement_table",
    "table1",
    "temperatures_table",
    "unit_variation_summary",
    "unit_variation_table",
]


def _num(value: Any) -> float:
    """A float, NaN for missing (None, pd.NA, NaN)."""
    return math.nan if value is None or pd.isna(value) else float(value)


def table1(chosen: list[dict[str, Any]]) -> pd.DataFrame:
    """DeepIoT's Table 1, one row per (model, device class): size, p50 latency and energy per
    kind, original vs compressed, with the reduction in %; validation accuracy (which decided)
    and test accuracy (reported only).

    ``chosen`` holds one dict per (model, class): ``model``, ``device_class``, ``baseline`` (the
    baseline candidate joined to its class metrics, or None), ``chosen`` (the chosen point, or
    None) and ``reason``.
    """
    rows = []
    for entry in chosen:
        b, c = entry["baseline"] or {}, entry["chosen"] or {}
        row: dict[str, Any] = {
            "model": entry["model"], "device_class": entry["device_class"],
            "chosen_trial": c.get("trial"), "chosen_artifact": c.get("artifact_hash"),
            "size_original_mb": _num(b.get("bytes")) / 1e6,
            "size_compressed_mb": _num(c.get("bytes")) / 1e6,
            "size_reduction_pct": reduction_pct(_num(b.get("bytes")), _num(c.get("bytes"))),
            "backend_original": b.get("backend"), "backend_compressed": c.get("backend"),
            "latency_p50_original_ms": _num(b.get("p50_ms")),
            "latency_p50_compressed_ms": _num(c.get("p50_ms")),
            "latency_reduction_pct": reduction_pct(_num(b.get("p50_ms")), _num(c.get("p50_ms"))),
        }
        note = entry["reason"]
        # A time (or time-based energy) ratio across two runtimes is the runtimes' ratio, not
        # compression's; the operation-count estimate does not depend on the runtime.
        across = bool(b.get("backend") and c.get("backend") and b.get("backend") != c.get("backend"))
        if across:
            row["latency_reduction_pct"] = math.nan
            note += (f"; the original ran {b.get('backend')}, the compressed {c.get('backend')}: no "
                     "reduction of time or measured energy is given across runtimes")
        for kind, column in ENERGY_COLUMNS.items():
            o, n = _num(b.get(column)), _num(c.get(column))
            row[f"energy_{kind}_original_mj"] = o
            row[f"energy_{kind}_compressed_mj"] = n
            row[f"energy_{kind}_reduction_pct"] = math.nan if across and kind != "estimated" else reduction_pct(o, n)
        row.update({
            "accuracy_val_original": _num(b.get("accuracy_val")),
            "accuracy_val_compressed": _num(c.get("accuracy_val")),
            "accuracy_drop_pp": _num(c.get("drop_pp")),
            "accuracy_test_original": _num(b.get("accuracy_test")),
            "accuracy_test_compressed": _num(c.get("accuracy_test")),
            "note": note,
        })
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # An energy kind with no value anywhere (e.g. no sensor at all) would be a column of blanks.
    empty = [col for kind in ENERGY_COLUMNS for col in
             (f"energy_{kind}_original_mj", f"energy_{kind}_compressed_mj",
              f"energy_{kind}_reduction_pct")
             if frame[f"energy_{kind}_original_mj"].isna().all()
             and frame[f"energy_{kind}_compressed_mj"].isna().all()]
    return frame.drop(columns=empty)


def latency_table(ok: pd.DataFrame, roles: Mapping[str, str], per_device: pd.DataFrame) -> pd.DataFrame:
    """Per (device, runtime, artifact) for the artifacts in ``roles`` (hash -> role label):
    percentiles of all timed runs pooled over the device's successful rows of that runtime
    (``ok``, from :func:`ok_rows`; rows of two runtimes are never pooled), and the device values
    that ``per_device`` (:func:`device_metrics`) holds: CPU time, model load, peak memory and
    energy per kind."""
    keys = ["device_class", "device", "backend", "artifact_hash"]
    r = ok.loc[ok["artifact_hash"].isin(list(roles))].assign(backend=ok["backend"].fillna("unknown"))
    out = []
    for (cls, device, backend, h), g in r.groupby(keys, sort=True):
        lat = np.concatenate([np.asarray(v, dtype=float) for v in g["latencies_ms"]
                              if v is not None and len(v)])
        if lat.size == 0:
            continue
        s = box_stats(lat)
        out.append({
            "device_class": cls, "device": device, "backend": backend, "role": roles[h], "artifact_hash": h,
            "rows": len(g), "runs": s["runs"], "p50_ms": s["p50"], "p90_ms": s["p90"],
            "p99_ms": s["p99"], "mean_ms": s["mean"], "q1_ms": s["q1"], "q3_ms": s["q3"],
            "p1_ms": s["p1"], "batch": ",".join(str(b) for b in sorted(set(g["batch"].dropna()))),
        })
    columns = ["device_class", "device", "backend", "role", "artifact_hash", "rows", "runs", "p50_ms",
               "p90_ms", "p99_ms", "mean_ms", "q1_ms", "q3_ms", "p1_ms", "batch"]
    table = pd.DataFrame(out, columns=columns)  # empty: still its columns
    energy = per_device[[*keys, "cpu_p50_ms", "init_ms", "memory_peak_mb", *ENERGY_COLUMNS.values()]]
    table = table.merge(energy, on=keys, how="left")
    return table[[c for c in table.columns if c != "batch"] + ["batch"]]


def devices_table(results: pd.DataFrame, per_device: pd.DataFrame) -> pd.DataFrame:
    """One row per device: class, arch, rows (ok / failed / reference), artifacts measured,
    backends (the runtimes with their versions), threads, and ``relative_p50`` — the median over
    its artifacts of its p50 divided by the median p50 of that artifact on the class's devices
    that ran the same runtime (1.0: a typical unit of its class; 1.2: 20 % slower)."""
    pd_ = per_device.copy()
    cls_median = pd_.groupby(["artifact_hash", "device_class", "backend"])["p50_ms"].transform("median")
    pd_["ratio"] = pd_["p50_ms"] / cls_median
    relative = pd_.groupby("device")["ratio"].median()
    rows = []
    for device, g in results.groupby("device", sort=True):
        ok = g["error"].isna()
        ref = g["reference"].fillna(False).astype(bool)
        rows.append({
            "device": device, "device_class": ", ".join(sorted(set(g["device_class"]))),
            "arch": ", ".join(sorted(set(g["arch"].dropna()))),
            "rows_ok": int((ok & ~ref).sum()), "rows_failed": int((~ok).sum()),
            "rows_reference": int((ok & ref).sum()),
            "artifacts": int(g.loc[ok & ~ref, "artifact_hash"].nunique()),
            "backends": ", ".join(sorted({f"{b} {v}" if isinstance(v, str) else str(b) for b, v in
                                          zip(g["backend"], g["backend_version"]) if isinstance(b, str)})),
            "threads": ", ".join(str(t) for t in sorted(set(g["threads"].dropna()))),
            "relative_p50": float(relative.get(device, math.nan)),
        })
    return pd.DataFrame(rows)


def unit_variation_table(per_device: pd.DataFrame) -> pd.DataFrame:
    """Per (device class, artifact, runtime) measured on >= 2 devices of the class with that
    runtime: the devices' p50 median, min, max and the coefficient of variation (sample std /
    mean) of the device p50s in %. Vectorised: a study has thousands of (class, artifact)
    pairs."""
    g = per_device.dropna(subset=["p50_ms"]).groupby(["device_class", "artifact_hash", "backend"], sort=True)
    out = g["p50_ms"].agg(devices="count", p50_median_ms="median", p50_min_ms="min",
                          p50_max_ms="max", _mean="mean", _std="std").reset_index()
    out = out.loc[out["devices"] >= 2]
    # same definition as _stats.coefficient_of_variation (pandas' std is ddof=1 too)
    cv = 100.0 * out["_std"] / out["_mean"].where(out["_mean"] != 0)
    return out.drop(columns=["_mean", "_std"]).assign(cv_p50_pct=cv).reset_index(drop=True)


def unit_variation_summary(variation: pd.DataFrame) -> pd.DataFrame:
    """Per device class: how many artifacts were compared and the median / p90 / max of their
    CV of p50 across the class's devices (the unit-to-unit spread)."""
    rows = []
    for cls, g in variation.groupby("device_class", sort=True):
        cv = g["cv_p50_pct"].dropna()
        worst = g.loc[cv.idxmax()] if len(cv) else None
        rows.append({"device_class": cls, "artifacts": len(g), "devices_max": int(g["devices"].max()),
                     "cv_p50_median_pct": float(cv.median()) if len(cv) else math.nan,
                     "cv_p50_p90_pct": float(cv.quantile(0.9)) if len(cv) else math.nan,
                     "cv_p50_max_pct": float(cv.max()) if len(cv) else math.nan,
                     "worst_artifact": worst["artifact_hash"] if worst is not None else None})
    # the columns even with no rows: an empty CSV still says what it would hold
    return pd.DataFrame(rows, columns=["device_class", "artifacts", "devices_max",
                                       "cv_p50_median_pct", "cv_p50_p90_pct", "cv_p50_max_pct",
                                       "worst_artifact"])


def rank_agreement_table(per_class: pd.DataFrame, chosen_by_class: Mapping[str, str | None]
                         ) -> pd.DataFrame:
    """For each pair of device classes: over the artifacts both measured (class p50), Kendall's
    tau-b and Spearman's rho of their latency rankings, and whether both chose the same
    artifact (``chosen_by_class``: class -> chosen hash or None)."""
    wide = per_class.pivot_table(index="artifact_hash", columns="device_class", values="p50_ms",
                                 aggfunc="median")
    rows = []
    for a, b in combinations(sorted(wide.columns), 2):
        both = wide[[a, b]].dropna()
        ca, cb = chosen_by_class.get(a), chosen_by_class.get(b)
        rows.append({"class_a": a, "class_b": b, "common_artifacts": len(both),
                     "kendall_tau_b": kendall_tau_b(both[a], both[b]),
                     "spearman_rho": spearman_rho(both[a], both[b]),
                     "same_chosen": None if ca is None or cb is None else ca == cb})
    return pd.DataFrame(rows, columns=["class_a", "class_b", "common_artifacts", "kendall_tau_b",
                                       "spearman_rho", "same_chosen"])


def layers_table(chosen_rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per layer of each distinct chosen model: units before/after and the kept fraction in %
    (from the candidate's ``layers``); ``classes`` names the device classes that chose it."""
    by_hash: dict[str, dict[str, Any]] = {}
    for entry in chosen_rows:
        c = entry["chosen"]
        if c is None:
            continue
        seen = by_hash.setdefault(c["artifact_hash"], {"row": c, "classes": []})
        seen["classes"].append(entry["device_class"])
    rows = []
    for h, seen in by_hash.items():
        layers = seen["row"].get("layers")
        if layers is None or (isinstance(layers, float) and pd.isna(layers)):
            continue
        for layer in layers:
            before, after = layer.get("units_before"), layer.get("units_after")
            rows.append({"artifact_hash": h, "trial": seen["row"].get("trial"),
                         "classes": ", ".join(seen["classes"]), "layer": layer.get("name"),
                         "kind": layer.get("kind"), "units_before": before, "units_after": after,
                         "kept_pct": 100.0 * after / before if before else math.nan,
                         "params_before": layer.get("params_before"),
                         "params_after": layer.get("params_after")})
    return pd.DataFrame(rows)


def agents_table(results: pd.DataFrame) -> pd.DataFrame:
    """Software that measured: agent, device Python/numpy, the runtime (backend, its version and
    execution provider) and driver versions, with counts."""
    keys = ["agent_version", "device_python", "device_numpy", "backend", "backend_version", "provider",
            "code_version"]
    g = results.fillna({k: "(unknown)" for k in keys}).groupby(keys, sort=True)
    return g.agg(devices=("device", "nunique"), rows=("device", "size")).reset_index()


def artifacts_table(results: pd.DataFrame, roles: Mapping[str, str],
                    candidates: pd.DataFrame | None,
                    manifests: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Every artifact measured: full hash, role, model, compressor, trial, params, bytes, rows,
    devices, and whether its manifest is in artifacts/ (model and compressor fall back to the
    manifest when the rows lack them)."""
    g = results.groupby("artifact_hash", sort=True)
    out = g.agg(model=("model_name", "first"), compressor=("compressor", "first"),
                params=("params", "first"), bytes=("artifact_bytes", "first"),
                rows=("device", "size"), rows_failed=("error", "count"),
                devices=("device", "nunique"), reference=("reference", "any")).reset_index()
    trial: dict[str, Any] = {}
    if candidates is not None:
        known = candidates.dropna(subset=["artifact_hash"])
        trial = dict(zip(known["artifact_hash"], known["trial"].astype("Float64")))
    hashes = out["artifact_hash"]
    out["model"] = out["model"].fillna(hashes.map(lambda h: manifests.get(h, {}).get("model")))
    out["compressor"] = out["compressor"].fillna(hashes.map(
        lambda h: compressor_label(manifests.get(h, {}).get("compressor"))))
    out.insert(1, "role", [roles.get(h, "reference" if ref else "candidate")
                           for h, ref in zip(hashes, out["reference"])])
    out.insert(4, "trial", hashes.map(trial).astype("Float64").astype("Int64"))
    out["manifest"] = hashes.map(lambda h: h in manifests)
    # what a reader looks for first: the original and chosen models, then drift references
    rank = out["role"].map(lambda r: 0 if r == "original" else 1 if r.startswith("chosen")
                           else 2 if r == "reference" else 3)
    out = out.assign(_rank=rank).sort_values(["_rank", "trial", "artifact_hash"], kind="stable")
    return out.drop(columns=["reference", "_rank"]).reset_index(drop=True)


def energy_sources_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per (energy kind, device): where energy numbers came from and how they were sampled.
    Kinds are separate rows: a measured and a simulated number are never pooled."""
    r = ok_rows(results).copy()
    r["energy_kind"] = r["energy_kind"].fillna("(none)")
    r["energy_source"] = r["energy_source"].fillna("(no sensor)")
    r["simulated"] = r["simulated"].fillna("")
    g = r.groupby(["energy_kind", "device_class", "device", "energy_source", "simulated"], sort=True)
    out = g.agg(rows=("device", "size"), energy_median_mj=("energy_per_inference_mj", "median"),
                estimated_median_mj=("estimated_energy_mj", "median"),
                time_estimated_median_mj=("time_estimated_energy_mj", "median"),
                stated_power_w=("stated_power_w", "median"),
                samples_median=("energy_samples", "median"),
                sample_hz_median=("energy_sample_hz", "median"),
                idle_power_w_median=("idle_power_w", "median")).reset_index()
    # rows of kind 'estimated' have no measured number: the column says so by being empty
    return out


def temperatures_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per device: temperature before/after runs (median, max), the largest rise, governors and
    median frequency, over successful rows (reference rows included: they heat the device too)."""
    r = results.loc[results["error"].isna()].copy()
    r["rise_c"] = r["temp_after_c"] - r["temp_before_c"]
    g = r.groupby(["device_class", "device"], sort=True)
    out = g.agg(temp_before_median_c=("temp_before_c", "median"),
                temp_before_max_c=("temp_before_c", "max"),
                temp_after_median_c=("temp_after_c", "median"),
                temp_after_max_c=("temp_after_c", "max"), rise_max_c=("rise_c", "max"),
                freq_median_mhz=("freq_before_mhz", "median"),
                load_1m_median=("load_1m", "median")).reset_index()
    governors = g["governor"].agg(lambda s: ", ".join(sorted(set(s.dropna()))))
    out["governors"] = governors.to_numpy()
    return out


def drift_table(results: pd.DataFrame) -> pd.DataFrame:
    """Drift checks (``reference`` rows) per (device, reference artifact): how many, over what
    time, first and last p50, the change in %, and the CV of p50 over the checks."""
    r = ok_rows(results, reference=True)
    rows = []
    for (cls, device, h), g in r.groupby(["device_class", "device", "artifact_hash"], sort=True):
        g = g.sort_values("started_at")
        p50 = g["p50_ms"].to_numpy(dtype=float)
        rows.append({"device_class": cls, "device": device, "artifact_hash": h, "checks": len(g),
                     "first_at": g["started_at"].iloc[0], "last_at": g["started_at"].iloc[-1],
                     "p50_first_ms": p50[0], "p50_last_ms": p50[-1],
                     "change_pct": -reduction_pct(p50[0], p50[-1]),
                     "cv_p50_pct": 100.0 * coefficient_of_variation(p50),
                     "temp_max_c": _num(g["temp_after_c"].max())})
    return pd.DataFrame(rows)


def failures_table(results: pd.DataFrame) -> pd.DataFrame:
    """Failed measurements grouped by (device, error): count, first and last time."""
    f = results.loc[results["error"].notna()]
    g = f.groupby(["device_class", "device", "error"], sort=True)
    return g.agg(rows=("device", "size"), first_at=("started_at", "min"),
                 last_at=("started_at", "max")).reset_index()


def predictions_table(cands: pd.DataFrame, per_class: pd.DataFrame) -> pd.DataFrame:
    """Per (device_class, metric): predictions made before measurement, how many were then
    measured, their median relative error and share within 10 %, the predictor(s) and its own
    held-out error estimate, and how many candidates were rejected on a prediction."""
    columns = {m: c for c, m in COLUMNS.items()}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    measured = per_class.set_index(["artifact_hash", "device_class"])
    for _, c in cands.iterrows():
        preds = c.get("predictions")
        if preds is None or (isinstance(preds, float) and math.isnan(preds)):
            continue
        for p in preds:
            r = rows.setdefault((p["device_class"], p["metric"]), {
                "device_class": p["device_class"], "metric": p["metric"], "predicted": 0, "measured": 0,
                "errors": [], "predictors": set(), "held_out_error_pct": [], "rejected": 0})
            r["predicted"] += 1
            r["predictors"].add(f"{p.get('predictor') or 'linear'} ({p.get('source') or 'own'})")
            if p.get("error") is not None:
                r["held_out_error_pct"].append(100 * p["error"])
            r["rejected"] += int(c["outcome"] == "predicted_infeasible")
            col = columns.get(p["metric"])
            key = (c["artifact_hash"], p["device_class"])
            if col and key in measured.index and not math.isnan(float(measured.loc[key, col])):
                actual = float(measured.loc[key, col])
                r["measured"] += 1
                r["errors"].append(abs(p["value"] - actual) / actual)
    out = []
    for r in rows.values():
        errs = np.array(r.pop("errors"))
        held = r.pop("held_out_error_pct")
        out.append({**r, "predictors": ", ".join(sorted(r["predictors"])),
                    "median_error_pct": 100 * float(np.median(errs)) if len(errs) else math.nan,
                    "within_10pct": float(np.mean(errs <= 0.10)) if len(errs) else math.nan,
                    "held_out_error_pct": float(np.median(held)) if held else math.nan})
    return pd.DataFrame(out, columns=["device_class", "metric", "predicted", "measured", "median_error_pct",
                                      "within_10pct", "held_out_error_pct", "predictors", "rejected"])
