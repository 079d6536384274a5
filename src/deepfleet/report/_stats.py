"""Pure statistics for reports: Pareto fronts, rank correlations, variation, reductions.

Every function takes plain numbers or numpy arrays and returns numbers or arrays; none reads
files or frames. NaN means "no value" (too few points, constant input, missing operand).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "box_stats",
    "coefficient_of_variation",
    "kendall_tau_b",
    "pareto_mask",
    "reduction_pct",
    "spearman_rho",
]


def pareto_mask(maximize: Sequence[float] | np.ndarray,
                minimize: Sequence[float] | np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (higher-or-equal ``maximize`` and
    lower-or-equal ``minimize``, one strictly). Identical points are all on the front. Points
    with a NaN coordinate are never on it. O(n log n).
    """
    up = np.asarray(maximize, dtype=float)
    down = np.asarray(minimize, dtype=float)
    if up.shape != down.shape:
        raise ValueError(f"pareto_mask needs equal lengths, but got {up.shape} and {down.shape}")
    mask = np.zeros(up.shape, dtype=bool)
    valid = np.flatnonzero(~(np.isnan(up) | np.isnan(down)))
    # Sweep by cost ascending (ties: better first): a point is on the front only if it beats
    # every cheaper point, or exactly repeats the front point that set the record.
    order = valid[np.lexsort((-up[valid], down[valid]))]
    best, best_cost = -math.inf, math.nan
    for i in order:
        if up[i] > best:
            mask[i], best, best_cost = True, up[i], down[i]
        elif up[i] == best and down[i] == best_cost:
            mask[i] = True
    return mask


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of positions s+1 .. e
    return ranks


def _pair(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"rank correlation needs equal lengths, but got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def spearman_rho(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on average ranks) over pairs without NaN.

    NaN with fewer than 2 pairs or when either side is constant.
    """
    a, b = _pair(x, y)
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return math.nan if denom == 0 else float(ra @ rb) / denom


def kendall_tau_b(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b (ties corrected) over pairs without NaN; NaN as :func:`spearman_rho`.

    O(n^2) memory and time in blocks of rows: fine for the few thousand artifacts a study has.
    """
    a, b = _pair(x, y)
    n = len(a)
    if n < 2:
        return math.nan
    concordant = discordant = ties_a = ties_b = 0
    block = max(1, 2_000_000 // n)  # bound the temporary (block, n) matrices to ~16 MB each
    for s in range(0, n, block):
        da = np.sign(a[s:s + block, None] - a[None, :])
        db = np.sign(b[s:s + block, None] - b[None, :])
        prod = da * db
        concordant += int((prod > 0).sum())
        discordant += int((prod < 0).sum())
        ties_a += int(((da == 0) & (db != 0)).sum())
        ties_b += int(((db == 0) & (da != 0)).sum())
    # every unordered pair was counted twice (i, j) and (j, i): the ratio is unaffected
    n0 = concordant + discordant
    denom = math.sqrt((n0 + ties_a) * (n0 + ties_b))
    return math.nan if denom == 0 else (concordant - discordant) / denom


def coefficient_of_variation(values: Sequence[float] | np.ndarray) -> float:
    """Sample standard deviation (ddof=1) over the mean, NaN ignored; NaN below 2 values or
    for a mean of 0."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) < 2 or v.mean() == 0:
        return math.nan
    return float(v.std(ddof=1) / v.mean())


def reduction_pct(original: float | None, compressed: float | None) -> float:
    """How much smaller ``compressed`` is than ``original``, in % (negative: it grew).

    NaN when either is missing or ``original`` is not positive.
    """
    if original is None or compressed is None:
        return math.nan
    o, c = float(original), float(compressed)
    if math.isnan(o) or math.isnan(c) or o <= 0:
        return math.nan
    return 100.0 * (1.0 - c / o)


def box_stats(latencies: np.ndarray) -> dict[str, float]:
    """Summary of one latency distribution for a box plot and the p50/p90/p99 table.

    Box: quartiles; whiskers: 1st and 99th percentiles (no outlier points are drawn: a report
    summarises distributions of thousands of runs instead of plotting each one).
    """
    lat = np.asarray(latencies, dtype=float)
    if lat.size == 0:
        raise ValueError("box_stats needs at least one latency")
    p1, q1, p50, q3, p90, p99 = np.percentile(lat, [1, 25, 50, 75, 90, 99])
    return {"runs": int(lat.size), "p1": float(p1), "q1": float(q1), "p50": float(p50),
            "q3": float(q3), "p90": float(p90), "p99": float(p99), "mean": float(lat.mean()),
            "min": float(lat.min()), "max": float(lat.max())}
