"""Pure statistics: Pareto fronts against brute force, rank correlations against SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepfleet.report._stats import (
    box_stats,
    coefficient_of_variation,
    kendall_tau_b,
    pareto_mask,
    reduction_pct,
    spearman_rho,
)


def _brute_front(up: np.ndarray, down: np.ndarray) -> np.ndarray:
    n = len(up)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        if math.isnan(up[i]) or math.isnan(down[i]):
            continue
        out[i] = not any(up[j] >= up[i] and down[j] <= down[i] and (up[j] > up[i] or down[j] < down[i])
                         for j in range(n) if not (math.isnan(up[j]) or math.isnan(down[j])))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_brute_force_with_ties_and_nan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    up = rng.integers(0, 8, 60).astype(float)  # few distinct values: many ties
    down = rng.integers(0, 8, 60).astype(float)
    up[rng.integers(0, 60, 3)] = np.nan
    np.testing.assert_array_equal(pareto_mask(up, down), _brute_front(up, down))


def test_pareto_mask_small_cases() -> None:
    # (accuracy, latency): b dominates c; a and b trade off; d duplicates b
    mask = pareto_mask([0.99, 0.98, 0.97, 0.98], [10.0, 5.0, 6.0, 5.0])
    assert mask.tolist() == [True, True, False, True]
    assert pareto_mask([], []).tolist() == []
    with pytest.raises(ValueError, match="equal lengths"):
        pareto_mask([1.0], [1.0, 2.0])


def test_rank_correlations_match_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.normal(size=80)
    y = x + rng.normal(scale=0.7, size=80)
    x[::7] = np.round(x[::7])  # ties
    y[::5] = 0.0
    assert kendall_tau_b(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic, abs=1e-12)
    assert spearman_rho(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_rank_correlations_by_hand() -> None:
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman_rho([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(spearman_rho([1, 2, 3], [5, 5, 5]))  # constant side
    assert math.isnan(kendall_tau_b([1.0], [2.0]))
    assert kendall_tau_b([1, 2, np.nan, 3], [1, 2, 9, 3]) == pytest.approx(1.0)  # NaN pair dropped


def test_cv_reduction_and_box_stats() -> None:
    assert coefficient_of_variation([9.0, 10.0, 11.0]) == pytest.approx(0.1)
    assert math.isnan(coefficient_of_variation([5.0]))
    assert reduction_pct(50.2, 14.2) == pytest.approx(71.71, abs=0.01)  # DeepIoT LeNet5 time
    assert reduction_pct(10, 12) == pytest.approx(-20.0)
    assert math.isnan(reduction_pct(None, 1.0)) and math.isnan(reduction_pct(0.0, 1.0))
    s = box_stats(np.arange(1, 101, dtype=float))
    assert s["runs"] == 100 and s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert s["q1"] < s["p50"] < s["q3"] < s["p90"] < s["p99"] <= s["max"]
    with pytest.raises(ValueError):
        box_stats(np.array([]))
