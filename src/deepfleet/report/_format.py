"""Turning table cells into text, the same way for HTML and Markdown (CSV keeps raw values).

The column name decides the format, so every table formats alike: ``*_pct`` one decimal,
``*_pp`` two, ``accuracy*`` as a percentage, hashes shortened only where asked, counts with
thousands separators, other numbers to 4 significant digits. Missing values print as an en dash.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
from typing import Any

import numpy as np
import pandas as pd

from deepfleet.report._analysis import ENERGY_COLUMNS

__all__ = ["MISSING", "energy_kind_of", "format_value", "paper_table1"]

MISSING = "–"
_KINDS = tuple(ENERGY_COLUMNS)


def energy_kind_of(column: str) -> str | None:
    """The energy kind a column holds ("measured", "simulated", "estimated", "time_estimated"),
    or None."""
    if "energy" not in column:
        return None
    # longest first: "energy_time_estimated_mj" also contains "estimated"
    return next((k for k in sorted(_KINDS, key=len, reverse=True) if k in column), None)


def format_value(column: str, value: Any, *, short_hash: bool = False) -> str:
    """Text for one cell of ``column``; ``short_hash`` cuts sha256 values to 12 characters."""
    if value is None or (not isinstance(value, (list, tuple, dict)) and pd.isna(value)):
        return MISSING
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, str):
        if short_hash and column.endswith(("hash", "artifact")) and len(value) == 64:
            return value[:12] + "…"
        return value
    if isinstance(value, numbers.Integral) or (
            isinstance(value, numbers.Real) and float(value).is_integer()
            and ("rows" in column or column in _COUNTS)):
        return f"{int(float(value)):,}"
    v = float(value)
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if column.endswith("_pct"):
        return f"{v:.1f}"
    if column.endswith("_pp"):
        return f"{v:.2f}"
    if column.startswith("accuracy"):
        return f"{100 * v:.2f} %"
    if column.startswith(("kendall", "spearman")) or column == "relative_p50":
        return f"{v:.3f}"
    return f"{v:.4g}"


_COUNTS = {"runs", "devices", "artifacts", "checks", "trial", "chosen_trial", "params", "bytes",
           "units_before", "units_after", "params_before", "params_after", "common_artifacts",
           "devices_max", "samples_median", "batch"}


def _change(original: Any, compressed: Any, reduction: Any, column: str) -> str:
    """'orig → comp (−x %)' in the style of DeepIoT's Table 1."""
    o, c = format_value(column, original), format_value(column, compressed)
    if c == MISSING:
        return o if o == MISSING else f"{o} → {MISSING}"
    r = "" if pd.isna(reduction) else f" (−{reduction:.1f} %)" if reduction >= 0 else f" (+{-reduction:.1f} %)"
    return f"{o} → {c}{r}"


def paper_table1(table1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 laid out like the paper's: one text cell per quantity, 'original → compressed
    (reduction)'. Energy keeps one column per kind, named with its kind in capitals."""
    rows = []
    for r in table1.to_dict("records"):
        row = {"model": r["model"], "device class": r["device_class"],
               "size (MB)": _change(r["size_original_mb"], r["size_compressed_mb"],
                                    r["size_reduction_pct"], "size_mb"),
               "runtime": (r["backend_original"] if r["backend_original"] == r["backend_compressed"]
                           else f"{format_value('backend', r['backend_original'])} → "
                                f"{format_value('backend', r['backend_compressed'])}"),
               "p50 latency (ms)": _change(r["latency_p50_original_ms"],
                                           r["latency_p50_compressed_ms"],
                                           r["latency_reduction_pct"], "latency_ms")}
        for kind in _KINDS:
            if f"energy_{kind}_original_mj" in r:
                row[f"energy {kind.upper().replace('_', ' ')} (mJ)"] = _change(
                    r[f"energy_{kind}_original_mj"], r[f"energy_{kind}_compressed_mj"],
                    r[f"energy_{kind}_reduction_pct"], "energy_mj")
        drop = r["accuracy_drop_pp"]
        row["validation accuracy"] = (
            f"{format_value('accuracy', r['accuracy_val_original'])} → "
            f"{format_value('accuracy', r['accuracy_val_compressed'])}"
            + ("" if pd.isna(drop) else f" (−{drop:.2f} pp)"))
        row["test accuracy (reported only)"] = (
            f"{format_value('accuracy', r['accuracy_test_original'])} → "
            f"{format_value('accuracy', r['accuracy_test_compressed'])}")
        row["chosen trial"] = format_value("trial", r["chosen_trial"])
        rows.append(row)
    return pd.DataFrame(rows)
