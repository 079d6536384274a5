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

__all__ = ["MINUS", "MISSING", "energy_kind_of", "format_value", "paper_table1", "signed"]

MISSING = "–"
MINUS = "\u2212"  # the Unicode minus sign of the report's text (never a hyphen, never two)
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
        return _fixed(v, 1)
    if column.endswith("_pp"):
        return _fixed(v, 2)
    if column.startswith("accuracy"):
        return f"{100 * v:.2f} %"
    if column.startswith(("kendall", "spearman")) or column == "relative_p50":
        return f"{v:.3f}"
    return f"{v:.4g}"


def _fixed(v: float, digits: int) -> str:
    """``v`` to ``digits`` decimals; a value that rounds to zero prints without a sign ('-0.0'
    would read as a change that is not there)."""
    text = f"{v:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


_COUNTS = {"runs", "devices", "artifacts", "checks", "trial", "chosen_trial", "params", "bytes",
           "units_before", "units_after", "params_before", "params_after", "common_artifacts",
           "devices_max", "samples_median", "batch"}


def signed(change: float, *, digits: int, unit: str) -> str:
    """A signed difference as text, with exactly one sign: '+0.50 pp', '−0.50 pp' (Unicode
    minus), and no sign when it rounds to zero ('0.00 pp'). ``change`` is new − old."""
    text = f"{abs(change):.{digits}f}"
    if float(text) == 0:
        return f"{text} {unit}"
    return f"{MINUS if change < 0 else '+'}{text} {unit}"


def _change(original: Any, compressed: Any, reduction: Any, column: str) -> str:
    """'orig → comp (−x %)' in the style of DeepIoT's Table 1 (``reduction`` in % of the
    original: positive is smaller, shown with a minus sign)."""
    o, c = format_value(column, original), format_value(column, compressed)
    if c == MISSING:
        return o if o == MISSING else f"{o} → {MISSING}"
    r = "" if pd.isna(reduction) else f" ({signed(-float(reduction), digits=1, unit='%')})"
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
            + ("" if pd.isna(drop) else f" ({signed(-float(drop), digits=2, unit='pp')})"))
        row["test accuracy (reported only)"] = (
            f"{format_value('accuracy', r['accuracy_test_original'])} → "
            f"{format_value('accuracy', r['accuracy_test_compressed'])}")
        row["chosen trial"] = format_value("trial", r["chosen_trial"])
        rows.append(row)
    return pd.DataFrame(rows)
