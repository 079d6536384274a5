"""Structured L1-norm pruning (Li et al., 2017): keep each layer's units with the largest norms.

With a uniform ratio per layer, this is the baseline DeepIoT is compared against: same kept
fraction, same extraction, same fine-tuning, only the choice of units (and their spread over
layers) differs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from deepfleet.compressors._cost import CostModel, kept_fraction
from deepfleet.compressors._deepiot import group_matrices
from deepfleet.compressors._graph import Structure


def unit_norms(structure: Structure, model: fx.GraphModule) -> list[np.ndarray]:
    """L1 norm of each unit's incoming weights (all gates and directions for RNN units)."""
    return [m.abs().sum(0).cpu().numpy() for m in group_matrices(structure, model)]


def keep_by_ratio(norms: list[np.ndarray], ratio: float) -> list[np.ndarray]:
    """Per group, the ``ceil(ratio * size)`` units of largest norm (at least one)."""
    keep = []
    for n in norms:
        k = max(1, math.ceil(ratio * len(n)))
        mask = np.zeros(len(n), bool)
        mask[np.argsort(-n, kind="stable")[:k]] = True
        keep.append(mask)
    return keep


def uniform_l1_keep(
    structure: Structure, model: fx.GraphModule, cm: CostModel, target: float, metric: str = "params"
) -> tuple[list[np.ndarray], float]:
    """The largest uniform ratio whose L1 selection keeps at most ``target`` of ``metric``.

    Returns (keep masks, the ratio).
    """
    norms = unit_norms(structure, model)

    def frac(ratio: float) -> float:
        ks = keep_by_ratio(norms, ratio)
        return float(kept_fraction(cm, [torch.as_tensor(k, dtype=torch.float64) for k in ks], metric))

    lo, hi = 0.0, 1.0
    for _ in range(40):  # bisection on a monotone step function
        mid = (lo + hi) / 2
        if frac(mid) <= target:
            lo = mid
        else:
            hi = mid
    return keep_by_ratio(norms, lo), lo
