"""Cheap before dear: predict a candidate's latency and energy per device class from structure.

Per class and metric, a linear model ``y = a + b * MACs + c * params`` with non-negative
coefficients (work and weight traffic cannot make a model faster) is fitted on the result rows
measured so far. A candidate whose prediction breaks a constraint by more than a margin (at least
25 %, widened to twice the model's own leave-one-out error) is judged without board time.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import nnls

from deepfleet import metrics

MIN_POINTS = 4  # below this a fit is too easy to fool
FEATURES = ("macs", "params")


@dataclass(frozen=True)
class Fit:
    coef: tuple[float, ...]  # intercept, then one per feature
    points: int
    loo_error: float  # median relative leave-one-out error

    def predict(self, features: Mapping[str, float]) -> float:
        x = np.array([1.0] + [float(features[f]) for f in FEATURES])
        return float(x @ np.array(self.coef))


def _design(points: Sequence[Mapping[str, float]]) -> np.ndarray:
    return np.array([[1.0] + [float(p[f]) for f in FEATURES] for p in points])


def fit(points: Sequence[Mapping[str, float]], target: str) -> Fit | None:
    """Fit ``target`` from FEATURES over ``points`` (dicts); None with too few distinct points."""
    pts = [p for p in points if p.get(target) is not None]
    if len({tuple(p[f] for f in FEATURES) for p in pts}) < MIN_POINTS:
        return None
    X = _design(pts)
    y = np.array([float(p[target]) for p in pts])
    scale = np.abs(X).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(X / scale, y)
    errors = []
    for i in range(len(y)):  # leave-one-out: how wrong is the model on a point it has not seen
        mask = np.arange(len(y)) != i
        c, _ = nnls(X[mask] / scale, y[mask])
        errors.append(abs(float(X[i] / scale @ c) - y[i]) / max(abs(y[i]), 1e-12))
    return Fit(tuple(float(c) for c in coef / scale), len(y), float(statistics.median(errors)))


def margin_for(error: float) -> float:
    """How far above a limit a prediction must be to reject without measuring: 25 %, or twice
    the model's own held-out error when that is larger."""
    return max(0.25, 2 * error)


def training_points(rows: Sequence[Mapping[str, Any]], device_class: str, metric: str) -> list[dict[str, float]]:
    """Per artifact measured on ``device_class``: its features and its class value of
    ``metric`` (:func:`deepfleet.metrics.class_value`). Only artifacts measured with the
    class's most common runtime count (a model of numpy timings says nothing of onnxruntime's)."""
    by_artifact: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("device_class") == device_class and all(r.get(f) is not None for f in FEATURES):
            by_artifact.setdefault(str(r["artifact_hash"]), []).append(r)
    points: dict[str, list[dict[str, float]]] = {}
    for members in by_artifact.values():
        value = metrics.class_value(metric, members, device_class)
        backend = metrics.class_backend(members, device_class)
        if value is not None and backend is not None:
            points.setdefault(backend, []).append({**{f: float(members[0][f]) for f in FEATURES}, metric: value})
    return max(points.values(), key=len) if points else []
