"""Objectives and constraints as pure functions of plain data.

A *candidate* is a dict of what training knows (``accuracy``, ``accuracy_drop_pp``, ``bytes``,
``params``, ``macs``); *measurements* are result rows (dicts with ``device``, ``device_class``,
``p50_ms``, ``p90_ms``, ``energy_per_inference_mj``, ``estimated_energy_mj`` as in
:mod:`deepfleet.orchestrator.results`). Per-class metrics are the median
over that class's devices.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from deepfleet.search._spec import METRICS, StudySpec

#: Device metric -> the results column that measures it.
ROW_FIELD = {"latency_p50": "p50_ms", "latency_p90": "p90_ms", "energy": "energy_per_inference_mj"}


def row_value(metric: str, row: Mapping[str, Any]) -> float | None:
    """The value of a device metric in one row; energy falls back to the labelled estimate."""
    v = row.get(ROW_FIELD[metric])
    if v is None and metric == "energy":
        v = row.get("estimated_energy_mj")
    return None if v is None else float(v)


def class_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """{(metric, class): median over the class's devices of each device's value}.

    Failed rows (with an ``error``) and reference-model rows are ignored; a device measured
    more than once contributes its median.
    """
    per_device: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r.get("error") or r.get("reference"):
            continue
        for metric in ROW_FIELD:
            v = row_value(metric, r)
            if v is not None:
                per_device.setdefault((metric, r["device_class"], r["device"]), []).append(v)
    per_class: dict[tuple[str, str], list[float]] = {}
    for (metric, cls, _), values in per_device.items():
        per_class.setdefault((metric, cls), []).append(statistics.median(values))
    return {k: statistics.median(v) for k, v in per_class.items()}


def metric_value(metric: str, device_class: str | None, candidate: Mapping[str, Any],
                 per_class: Mapping[tuple[str, str], float]) -> float | None:
    if METRICS[metric][1]:
        return per_class.get((metric, device_class or ""))
    v = candidate.get(metric)
    return None if v is None else float(v)


def objective_values(spec: StudySpec, candidate: Mapping[str, Any],
                     per_class: Mapping[tuple[str, str], float]) -> list[float]:
    """One value per objective, in the study's order. Raises KeyError naming a missing one."""
    out = []
    for o in spec.objectives:
        v = metric_value(o.metric, o.device_class, candidate, per_class)
        if v is None:
            raise KeyError(f"objective {o.label} has no value (no successful measurement)")
        out.append(v)
    return out


def constraint_values(spec: StudySpec, candidate: Mapping[str, Any],
                      per_class: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """{constraint label: value - max} for the constraints that have a value (<= 0 is feasible)."""
    out = {}
    for c in spec.constraints:
        v = metric_value(c.metric, c.device_class, candidate, per_class)
        if v is not None:
            out[c.label] = v - c.max
    return out


def broken_before_measurement(spec: StudySpec, candidate: Mapping[str, Any]) -> dict[str, float]:
    """Constraints already violated by what training knows (accuracy, bytes, ...): no device time."""
    return {k: v for k, v in constraint_values(spec, candidate, {}).items() if v > 0}
