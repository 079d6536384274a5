"""Cell text: signed differences carry exactly one sign (the Unicode minus), in every table."""

from __future__ import annotations

import math
import re
from typing import Any

import pandas as pd
import pytest

from deepfleet.report import Report, ReportFiles
from deepfleet.report._format import MINUS, format_value, paper_table1, signed

# two signs in a row before a digit: '−-0.50', '+-1', '--2' (a flag like --max-drop has none)
_DOUBLE_SIGN = re.compile(r"[\u2212+\-]{2}\d")


@pytest.mark.parametrize(("change", "digits", "expected"), [
    (-0.5, 2, f"{MINUS}0.50 pp"),
    (0.5, 2, "+0.50 pp"),
    (0.0, 2, "0.00 pp"),
    (-0.001, 2, "0.00 pp"),  # rounds to zero: no sign at all
    (-12.345, 1, f"{MINUS}12.3 pp"),
])
def test_signed_has_one_sign(change: float, digits: int, expected: str) -> None:
    assert signed(change, digits=digits, unit="pp") == expected


def _table1_row(drop: float, reduction: float) -> dict[str, Any]:
    return {"model": "lenet5", "device_class": "pi4", "chosen_trial": 3,
            "size_original_mb": 1.7, "size_compressed_mb": 0.1, "size_reduction_pct": reduction,
            "latency_p50_original_ms": 10.0, "latency_p50_compressed_ms": 2.0,
            "latency_reduction_pct": 80.0, "accuracy_val_original": 0.98,
            "accuracy_val_compressed": 0.98 - drop / 100, "accuracy_drop_pp": drop,
            "accuracy_test_original": 0.97, "accuracy_test_compressed": 0.97,
            "backend_original": "onnxruntime", "backend_compressed": "onnxruntime"}


def test_paper_table1_signs_gains_and_losses_once() -> None:
    """A compressed model MORE accurate than its original (a negative drop) used to read
    '(−-0.50 pp)'; a size that grew read '(+x %)' but a zero reduction '(−0.0 %)'."""
    t = paper_table1(pd.DataFrame([_table1_row(-0.5, -20.0), _table1_row(0.5, 94.1),
                                   _table1_row(0.0, 0.0), _table1_row(math.nan, math.nan)]))
    acc, size = list(t["validation accuracy"]), list(t["size (MB)"])
    assert acc[0].endswith("(+0.50 pp)") and acc[1].endswith(f"({MINUS}0.50 pp)")
    assert acc[2].endswith("(0.00 pp)") and acc[3] == "98.00 % → –"  # nothing chosen
    assert size[0].endswith("(+20.0 %)") and size[1].endswith(f"({MINUS}94.1 %)")
    assert size[2].endswith("(0.0 %)") and size[3] == "1.7 → 0.1"
    for text in [*acc, *size]:
        assert not _DOUBLE_SIGN.search(text), text


def test_no_double_sign_anywhere_in_a_report(search_report: tuple[ReportFiles, Report]) -> None:
    files, _ = search_report
    for path in (files.html, files.markdown):
        text = re.sub(r"data:image/png;base64,[^\"]*", "", path.read_text())
        assert not _DOUBLE_SIGN.search(text), _DOUBLE_SIGN.search(text)


def test_a_change_that_rounds_to_zero_has_no_sign() -> None:
    """A drift table's change_pct of -0.0 (no change at all) printed as '-0.0'."""
    assert format_value("change_pct", -0.0) == "0.0"
    assert format_value("change_pct", -0.04) == "0.0"
    assert format_value("change_pct", -0.06) == "-0.1"
    assert format_value("accuracy_drop_pp", -0.001) == "0.00"
