"""How well a classifier's confidence matches its accuracy (RDeepSense's reliability figures),
and temperature scaling (Guo et al., ICML 2017).

Pure numpy functions of logits (N, classes) and integer labels (N,):

* :func:`ece`: expected calibration error, sum over equal-width confidence bins of
  (bin share) * |accuracy in the bin - mean confidence in the bin|, confidence = the largest
  softmax probability (a fraction; ``100 * ece`` is in percentage points);
* :func:`nll`: mean negative log likelihood of the true class (nats);
* :func:`brier`: mean over samples of sum over classes of (p_c - [y = c])^2 (Brier's original
  multi-class score, in [0, 2]);
* :func:`fit_temperature`: the T minimising the NLL of softmax(logits / T), by golden-section
  search on 1 / T (the NLL is convex in 1 / T) within [:data:`T_MIN`, :data:`T_MAX`].

Compression reports all three on the validation split for every candidate and the original.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["BINS", "T_MAX", "T_MIN", "brier", "calibration", "ece", "fit_temperature", "nll", "softmax"]

BINS = 15  # Guo et al.'s bin count
T_MIN, T_MAX = 0.05, 20.0  # temperatures searched / accepted: sharpen at most 20x, soften at most 20x


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    return np.exp(_log_softmax(logits))


def ece(logits: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of confidence, (lo, hi]."""
    p = softmax(logits)
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == np.asarray(y)).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - conf[members].mean())
    return float(total)


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log likelihood of the true classes (nats)."""
    y = np.asarray(y)
    return float(-_log_softmax(logits)[np.arange(len(y)), y].mean())


def brier(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean over samples of the squared distance between the softmax and the one-hot label."""
    p = softmax(logits)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), np.asarray(y)] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def calibration(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{"ece", "nll", "brier"} of ``logits`` against labels ``y``."""
    return {"ece": ece(logits, y), "nll": nll(logits, y), "brier": brier(logits, y)}


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, iterations: int = 80) -> float:
    """The temperature T in [T_MIN, T_MAX] that minimises ``nll(logits / T, y)``.

    The NLL of softmax(b z) is convex in b = 1 / T (a log-sum-exp minus a linear term), so a
    golden-section search on b over [1 / T_MAX, 1 / T_MIN] finds the minimum (to ~1e-16 of the
    interval after 80 steps)."""
    z = np.asarray(logits, dtype=np.float64)
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(z * a, y), nll(z * b, y)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(z * a, y)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(z * b, y)
    return float(1.0 / ((lo + hi) / 2))
