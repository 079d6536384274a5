"""Per-class metrics of each artifact, the candidates' Pareto points, and the chosen candidate.

Pure functions of frames (no I/O). The definitions a report rests on live here:

* **device value** and **class value** of each metric: as :mod:`deepfleet.metrics` defines them
  (the one definition the search's objectives and the predictor use too, so report and search
  agree): a device's median over its successful, non-reference rows of one runtime (a device
  value per (device, backend)), then the median over the class's devices, only when they all
  ran one runtime: a class whose devices ran an artifact in different runtimes has no class
  value (``backend`` says "mixed: ...", ``backend_note`` why and the fix);
* **energy** is kept per kind: ``energy_measured_mj`` (a real sensor), ``energy_simulated_mj``
  (a sensor that is a model), ``energy_estimated_mj`` (the operation-count estimate every row
  carries) and ``energy_time_estimated_mj`` (busy time x the device's stated power). They are
  separate columns, never combined;
* **chosen candidate** on a device class: see :data:`CHOSEN_RULE`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from deepfleet import metrics
from deepfleet.orchestrator.results import plain_rows
from deepfleet.report._stats import pareto_mask

__all__ = [
    "CHOSEN_RULE",
    "DEFAULT_MAX_DROP_PP",
    "ENERGY_COLUMNS",
    "candidate_frame",
    "choose",
    "class_metrics",
    "device_metrics",
    "ok_rows",
    "pareto_points",
]

DEFAULT_MAX_DROP_PP = 0.5
# The report's columns and the metric each shows (deepfleet.metrics defines how a metric is read
# from rows and combined over devices and classes: the report applies that, never its own rule).
COLUMNS = {"p50_ms": "latency_p50", "p90_ms": "latency_p90", "p99_ms": "latency_p99",
           "cpu_p50_ms": "cpu_p50", "init_ms": "init_ms", "memory_peak_mb": "memory_peak_mb",
           "energy_measured_mj": "energy", "energy_simulated_mj": "energy_simulated",
           "energy_estimated_mj": "energy_estimated",
           "energy_time_estimated_mj": "energy_time_estimated"}
# energy kind -> class-metric column; the order is the order of columns and plot panels
ENERGY_COLUMNS = {metrics.METRICS[m].energy_kind: c for c, m in COLUMNS.items() if c.startswith("energy")}
CHOSEN_RULE = (
    "The chosen candidate of a model on a device class is, among its candidates that (1) were "
    "measured and broke no constraint of the study, (2) lose at most MAX_DROP percentage points "
    "of VALIDATION accuracy against the original model (the test split is reported, never used "
    "to choose), and (3) have a successful measurement on that class, the one with the lowest "
    "class p50 latency (median over the class's devices of each device's median p50); ties go to "
    "higher validation accuracy, then fewer bytes, then the earlier trial. It is therefore on "
    "the Pareto front (validation accuracy vs p50 latency) of the feasible candidates."
)
_METRICS = list(COLUMNS)
# Limits are inclusive, and accuracies are ratios of counts: 100 * (0.98 - 0.975) is
# 0.5000000000000004 in floating point, which must still pass a 0.5 pp limit.
_EPS = 1e-9


def _is(series: pd.Series, value: object) -> pd.Series:
    """Element-wise ``series == value`` with missing values as False."""
    return series.eq(value).fillna(False).astype(bool)


def ok_rows(results: pd.DataFrame, *, reference: bool = False) -> pd.DataFrame:
    """Successful rows (no ``error``) that are (``reference=True``) or are not drift checks."""
    keep = results["error"].isna() & (_is(results["reference"], True) == reference)
    return results.loc[keep]


def device_metrics(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (artifact_hash, device_class, device, backend) over successful non-reference
    rows: each metric's device value (:func:`deepfleet.metrics.device_table`) and ``rows`` (how
    many measurements)."""
    keys = ["artifact_hash", "device_class", "device", "backend"]
    table = metrics.device_table(plain_rows(ok_rows(results)))
    frame = pd.DataFrame(table, columns=[*keys, "rows", *COLUMNS.values()])
    frame = frame.rename(columns={m: c for c, m in COLUMNS.items()})
    return frame[[*keys, *_METRICS, "rows"]].astype({c: float for c in _METRICS})


def _mixed(devices: pd.DataFrame) -> str:
    """"mixed: numpy (d2); onnxruntime (d1)" for one (artifact, class) group of device rows."""
    by = devices.groupby("backend", sort=True)["device"].agg(lambda d: ", ".join(sorted(set(d))))
    return "mixed: " + "; ".join(f"{b} ({d})" for b, d in by.items())


def class_metrics(per_device: pd.DataFrame) -> pd.DataFrame:
    """One row per (artifact_hash, device_class): medians over devices of :func:`device_metrics`,
    ``devices`` (how many devices measured it successfully), ``backend`` (the runtime they all
    ran) and ``backend_note``. When the devices ran different runtimes the metrics are missing
    (NaN: never pooled), ``backend`` is "mixed: ..." and the note says why and how to fix it."""
    keys = ["artifact_hash", "device_class"]
    grouped = per_device.groupby(keys, sort=True, observed=True)
    out = grouped[_METRICS].median()
    out["devices"] = grouped["device"].nunique()
    backends = grouped["backend"].nunique()
    out["backend"] = grouped["backend"].first()
    out["backend_note"] = None
    for key in backends.index[backends > 1]:
        devices = per_device.loc[(per_device["artifact_hash"] == key[0]) & (per_device["device_class"] == key[1])]
        out.loc[key, _METRICS] = math.nan
        out.loc[key, "backend"] = _mixed(devices)
        out.loc[key, "backend_note"] = metrics.backend_conflict(devices.to_dict("records"), key[1], key[0])
    return out.reset_index()


def _constraints_ok(constraints: object) -> bool:
    """True when every constraint's ``excess`` (value - max) is <= 0; no constraints is fine."""
    if constraints is None or (isinstance(constraints, float) and math.isnan(constraints)):
        return True
    return all(c["excess"] is not None and float(c["excess"]) <= _EPS for c in constraints)  # type: ignore[attr-defined]


def candidate_frame(candidates: pd.DataFrame) -> pd.DataFrame:
    """The candidates with ``model_key`` (model name, '' when unknown), ``drop_pp`` (validation
    drop vs the model's baseline: the stored column, else computed from the baseline row) and
    ``feasible`` (measured, no broken constraint). Baseline rows are kept (``kind='baseline'``).
    """
    c = candidates.copy()
    c["model_key"] = c["model"].fillna("").astype(str)
    base = (c.loc[_is(c["kind"], "baseline")].groupby("model_key")["accuracy_val"].first())
    computed = 100.0 * (c["model_key"].map(base) - c["accuracy_val"])
    c["drop_pp"] = c["accuracy_drop_pp"].where(c["accuracy_drop_pp"].notna(), computed)
    c["feasible"] = _is(c["outcome"], "measured") & c["constraints"].map(_constraints_ok)
    return c


def pareto_points(cands: pd.DataFrame, per_class: pd.DataFrame, device_class: str,
                  model_key: str) -> pd.DataFrame:
    """Candidates (not the baseline) of ``model_key`` joined to their class metrics on
    ``device_class`` (only those measured there), with ``front_latency`` and one
    ``front_<energy column>`` per kind: on the Pareto front of the FEASIBLE candidates for
    (validation accuracy up, metric down)."""
    mine = cands.loc[_is(cands["kind"], "candidate") & (cands["model_key"] == model_key)]
    metrics = per_class.loc[per_class["device_class"] == device_class]
    pts = mine.merge(metrics, on="artifact_hash", how="inner")
    for name, column in [("front_latency", "p50_ms"),
                         *[(f"front_{c}", c) for c in ENERGY_COLUMNS.values()]]:
        front = np.zeros(len(pts), dtype=bool)
        feasible = pts["feasible"].to_numpy(dtype=bool)
        if feasible.any():
            front[feasible] = pareto_mask(pts.loc[feasible, "accuracy_val"].to_numpy(dtype=float),
                                          pts.loc[feasible, column].to_numpy(dtype=float))
        pts[name] = front
    return pts


def choose(points: pd.DataFrame, max_drop_pp: float) -> tuple[dict[str, Any] | None, str]:
    """(the chosen row of ``points`` as a dict, or None; a one-line reason) per CHOSEN_RULE."""
    if points.empty:
        return None, "no candidate of this model was measured on this class"
    eligible = points.loc[points["feasible"].astype(bool)]
    if eligible.empty:
        return None, "no feasible candidate (every one failed or broke a constraint)"
    eligible = eligible.loc[eligible["drop_pp"] <= max_drop_pp + _EPS]
    if eligible.empty:
        best = points.loc[points["feasible"].astype(bool), "drop_pp"].min()
        return None, (f"no feasible candidate within {max_drop_pp:g} pp of validation accuracy "
                      f"(the smallest drop is {best:.2f} pp); raise --max-drop to accept more")
    ranked = eligible.assign(_bytes=eligible["bytes"].astype("Float64").fillna(math.inf),
                             _trial=eligible["trial"].astype("Float64").fillna(math.inf))
    ranked = ranked.sort_values(["p50_ms", "accuracy_val", "_bytes", "_trial"],
                                ascending=[True, False, True, True], kind="stable")
    row = ranked.iloc[0].drop(["_bytes", "_trial"]).to_dict()
    return row, (f"lowest p50 among {len(eligible)} feasible candidate(s) within "
                 f"{max_drop_pp:g} pp")
