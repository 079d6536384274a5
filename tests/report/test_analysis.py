"""Class metrics, energy kinds kept apart, and the chosen-candidate rule on hand-made frames."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from deepfleet.report._analysis import (
    candidate_frame,
    choose,
    class_metrics,
    device_metrics,
    pareto_points,
)


def _results(rows: list[dict[str, Any]]) -> pd.DataFrame:
    base = {"error": None, "reference": False, "energy_kind": "estimated",
            "energy_per_inference_mj": None, "estimated_energy_mj": 1.0, "p90_ms": None,
            "p99_ms": None}
    return pd.DataFrame([base | r for r in rows])


def test_class_value_is_median_over_devices_of_device_medians() -> None:
    r = _results([
        # device a measured twice (median 11), b once (30), c once (12): class median 12
        {"artifact_hash": "h", "device_class": "pi", "device": "a", "p50_ms": 10.0},
        {"artifact_hash": "h", "device_class": "pi", "device": "a", "p50_ms": 12.0},
        {"artifact_hash": "h", "device_class": "pi", "device": "b", "p50_ms": 30.0},
        {"artifact_hash": "h", "device_class": "pi", "device": "c", "p50_ms": 12.0},
        # failures and drift checks never count
        {"artifact_hash": "h", "device_class": "pi", "device": "c", "p50_ms": 999.0, "error": "x"},
        {"artifact_hash": "h", "device_class": "pi", "device": "c", "p50_ms": 999.0, "reference": True},
    ])
    per_device = device_metrics(r)
    assert per_device.set_index("device")["p50_ms"].to_dict() == {"a": 11.0, "b": 30.0, "c": 12.0}
    per_class = class_metrics(per_device)
    assert per_class.loc[0, "p50_ms"] == 12.0 and per_class.loc[0, "devices"] == 3


def test_energy_kinds_are_never_combined() -> None:
    r = _results([
        {"artifact_hash": "h", "device_class": "edison", "device": "real", "p50_ms": 1.0,
         "energy_kind": "measured", "energy_per_inference_mj": 10.0, "estimated_energy_mj": 0.3},
        {"artifact_hash": "h", "device_class": "edison", "device": "sim", "p50_ms": 1.0,
         "energy_kind": "simulated", "energy_per_inference_mj": 50.0, "estimated_energy_mj": 0.3},
        {"artifact_hash": "h", "device_class": "edison", "device": "none", "p50_ms": 1.0,
         "energy_kind": "estimated", "energy_per_inference_mj": None, "estimated_energy_mj": 0.3},
    ])
    row = class_metrics(device_metrics(r)).iloc[0]
    # each kind only from its own devices: 10 and 50 are never averaged to 30
    assert row["energy_measured_mj"] == 10.0 and row["energy_simulated_mj"] == 50.0
    assert row["energy_estimated_mj"] == pytest.approx(0.3)


def test_a_class_whose_devices_ran_different_runtimes_has_no_class_value() -> None:
    r = _results([
        {"artifact_hash": "h", "device_class": "pi", "device": "a", "p50_ms": 1.0, "backend": "onnxruntime"},
        {"artifact_hash": "h", "device_class": "pi", "device": "b", "p50_ms": 9.0, "backend": "numpy"},
        {"artifact_hash": "g", "device_class": "pi", "device": "a", "p50_ms": 2.0, "backend": "onnxruntime"},
        {"artifact_hash": "g", "device_class": "pi", "device": "b", "p50_ms": 3.0, "backend": "onnxruntime"},
    ])
    per_device = device_metrics(r)
    assert set(zip(per_device["device"], per_device["backend"])) == {("a", "onnxruntime"), ("b", "numpy"),
                                                                    ("b", "onnxruntime")}
    per_class = class_metrics(per_device).set_index("artifact_hash")
    assert math.isnan(per_class.loc["h", "p50_ms"])  # 1 and 9 of two runtimes: never a median of 5
    assert per_class.loc["h", "backend"] == "mixed: numpy (b); onnxruntime (a)"
    assert "numpy on b" in per_class.loc["h", "backend_note"] and "install onnxruntime" in per_class.loc["h", "backend_note"]
    assert per_class.loc["g", "p50_ms"] == 2.5 and per_class.loc["g", "backend"] == "onnxruntime"
    assert per_class.loc["g", "backend_note"] is None


def _cands(rows: list[dict[str, Any]]) -> pd.DataFrame:
    base = {"kind": "candidate", "outcome": "measured", "model": "m", "accuracy_drop_pp": None,
            "constraints": None, "bytes": 100, "accuracy_test": None}
    baseline = base | {"kind": "baseline", "outcome": "baseline", "trial": None,
                       "artifact_hash": "base", "accuracy_val": 0.98}
    return candidate_frame(pd.DataFrame([baseline] + [base | r for r in rows]))


def _per_class(p50: dict[str, float]) -> pd.DataFrame:
    return pd.DataFrame({"artifact_hash": list(p50), "device_class": "pi", "backend": "numpy",
                         "p50_ms": list(p50.values()), "energy_measured_mj": np.nan,
                         "energy_simulated_mj": np.nan, "energy_estimated_mj": 1.0,
                         "energy_time_estimated_mj": np.nan})


def test_chosen_is_fastest_feasible_within_the_validation_drop() -> None:
    cands = _cands([
        {"trial": 0, "artifact_hash": "fast-but-inaccurate", "accuracy_val": 0.97},  # 1 pp
        {"trial": 1, "artifact_hash": "breaks-constraint", "accuracy_val": 0.979,
         "constraints": [{"label": "bytes<=10", "excess": 5.0}]},
        {"trial": 2, "artifact_hash": "good", "accuracy_val": 0.977},  # 0.3 pp
        {"trial": 3, "artifact_hash": "slow", "accuracy_val": 0.979},
        # best TEST accuracy and fastest of all, but 2 pp down on validation: never chosen
        {"trial": 4, "artifact_hash": "test-split-star", "accuracy_val": 0.96,
         "accuracy_test": 0.999},
        {"trial": 5, "artifact_hash": "failed", "accuracy_val": 0.98, "outcome": "failed"},
    ])
    per_class = _per_class({"base": 50.0, "fast-but-inaccurate": 3.0, "breaks-constraint": 2.0,
                            "good": 5.0, "slow": 20.0, "test-split-star": 1.0, "failed": 0.5})
    pts = pareto_points(cands, per_class, "pi", "m")
    assert "base" not in set(pts["artifact_hash"])  # the baseline is not a candidate
    chosen, reason = choose(pts, 0.5)
    assert chosen is not None and chosen["artifact_hash"] == "good", reason
    assert chosen["drop_pp"] == pytest.approx(0.3)
    front = set(pts.loc[pts["front_latency"], "artifact_hash"])
    assert "good" in front and "breaks-constraint" not in front and "failed" not in front
    # a looser limit accepts the faster, less accurate one
    looser, _ = choose(pts, 1.5)
    assert looser is not None and looser["artifact_hash"] == "fast-but-inaccurate"


def test_ties_go_to_accuracy_then_bytes_then_trial() -> None:
    cands = _cands([
        {"trial": 7, "artifact_hash": "a", "accuracy_val": 0.979, "bytes": 90},
        {"trial": 3, "artifact_hash": "b", "accuracy_val": 0.979, "bytes": 90},
        {"trial": 1, "artifact_hash": "c", "accuracy_val": 0.979, "bytes": 95},
        {"trial": 0, "artifact_hash": "d", "accuracy_val": 0.978, "bytes": 10},
    ])
    pts = pareto_points(cands, _per_class({"a": 5.0, "b": 5.0, "c": 5.0, "d": 5.0}), "pi", "m")
    chosen, _ = choose(pts, 0.5)
    assert chosen is not None and chosen["artifact_hash"] == "b"


def test_nothing_chosen_says_why() -> None:
    cands = _cands([{"trial": 0, "artifact_hash": "a", "accuracy_val": 0.95}])
    pts = pareto_points(cands, _per_class({"a": 1.0}), "pi", "m")
    chosen, reason = choose(pts, 0.5)
    assert chosen is None and "smallest drop is 3.00 pp" in reason and "--max-drop" in reason
    empty = pareto_points(cands, _per_class({"a": 1.0}), "other-class", "m")
    assert choose(empty, 0.5) == (None, "no candidate of this model was measured on this class")


def test_drop_is_computed_from_the_baseline_when_not_stored() -> None:
    cands = _cands([{"trial": 0, "artifact_hash": "a", "accuracy_val": 0.975},
                    {"trial": 1, "artifact_hash": "b", "accuracy_val": 0.9, "accuracy_drop_pp": 0.1}])
    drops = cands.set_index("artifact_hash")["drop_pp"]
    assert drops["a"] == pytest.approx(0.5) and drops["b"] == pytest.approx(0.1)  # stored wins
    assert math.isclose(drops["base"], 0.0, abs_tol=1e-12)


def test_limits_are_inclusive_despite_floating_point() -> None:
    """Seen on a real demo run: 0.98 - 0.975 is 0.5000000000000004 pp, still within 0.5 pp."""
    cands = _cands([{"trial": 0, "artifact_hash": "a", "accuracy_val": 0.975,
                     "accuracy_drop_pp": 100 * (0.98 - 0.975),
                     "constraints": [{"label": "latency_p50@pi<=3", "excess": 3.0000000000000004 - 3}]}])
    assert cands.loc[1, "drop_pp"] > 0.5  # the premise: the float lands above the limit
    pts = pareto_points(cands, _per_class({"a": 1.0}), "pi", "m")
    chosen, reason = choose(pts, 0.5)
    assert chosen is not None and chosen["artifact_hash"] == "a", reason
