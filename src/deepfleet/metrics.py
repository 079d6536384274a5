"""The one definition of every metric: what it reads, its unit, and how devices and classes
combine. The search's objectives and constraints, the predictor and the report all use it.

Two families:

* **candidate metrics** (``accuracy``, ``accuracy_drop_pp``, ``ece``, ``nll``, ``brier``,
  ``bytes``, ``params``, ``macs``) are known once a model is compressed: a field of
  :class:`deepfleet.candidate.Candidate`;
* **device metrics** (latency, CPU time, loading, memory, energy) are measured on devices: a
  column of the results rows (:mod:`deepfleet.orchestrator.results`).

For a device metric and one artifact:

* a row's value is its column, from successful, non-reference rows only, and for energy only
  from rows of the metric's **kind** (``energy`` reads rows whose sensor is a real meter,
  ``energy_simulated`` rows whose sensor is a model, ``energy_estimated`` the operation-count
  estimate every row carries, ``energy_time_estimated`` the busy time x the device's stated
  power, where the fleet file states one). A value of one kind never stands in for another;
* a row's **backend** is the runtime that measured it (``backend``: numpy, onnxruntime, torch;
  "unknown" when not recorded). Runtimes are never pooled: the **device value** is per
  (device, backend), the median of that device's rows of that backend (a device measured twice
  with one runtime counts once);
* the **class value** is the median over the class's devices of their device values, and
  exists only when those devices all ran ONE backend. When the class's devices measured the
  artifact with different backends (a device without onnxruntime fell back to numpy, or one
  device was measured with each) there is no class value: :func:`backend_conflict` says which
  devices ran what, and the fix. The search's judge then fails the trial with that reason.

Sensing energy (what the sensors a model still reads cost per inference, :mod:`deepfleet.sensing`)
is an estimate from the fleet file's datasheet power, kind ``estimated``, read from the row's
``sensing_energy_mj``: ``energy_sensing``. ``energy_total`` is the one sum of two energy parts:
operation-count compute estimate + sensing estimate, both estimates (kind ``estimated``), None
unless the row has both. No metric adds measured (or simulated) compute energy to estimated
sensing energy: an objective that wants those names the two metrics separately.

Pure functions of plain data (dicts and dataclasses); no pandas, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENERGY_KINDS",
    "METRICS",
    "Metric",
    "backend_conflict",
    "backend_of",
    "class_backend",
    "class_value",
    "class_values",
    "device_table",
    "device_values",
    "metric",
    "row_value",
]

# Kinds of energy values: the three a row's ``energy_kind`` can name (its sensor's), and the
# time-based estimate every row with a stated power carries in its own column.
ENERGY_KINDS = ("measured", "simulated", "estimated", "time_estimated")


@dataclass(frozen=True, kw_only=True)
class Metric:
    """One metric.

    ``source`` is ``candidate`` (``field`` names a Candidate field) or ``device`` (``field``
    names a results column, read only from rows whose ``energy_kind`` is ``energy_kind`` when
    that is ``measured`` or ``simulated``). ``plus`` names a second column added to ``field``
    (a sum of two parts of the same kind; None when either is missing). ``sensing``: the
    metric needs the fleet file's sensor power. ``direction`` is the default for an objective.
    """

    name: str
    direction: str
    unit: str
    description: str
    source: str
    field: str
    energy_kind: str | None = None
    plus: str | None = None
    sensing: bool = False

    @property
    def per_device(self) -> bool:
        """True when the metric is measured per device class (an objective names a class)."""
        return self.source == "device"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric(name="accuracy", direction="maximize", unit="", source="candidate", field="accuracy_val",
           description="validation accuracy (fraction)"),
    Metric(name="accuracy_drop_pp", direction="minimize", unit="pp", source="candidate",
           field="accuracy_drop_pp",
           description="percentage points of validation accuracy below the original"),
    Metric(name="ece", direction="minimize", unit="", source="candidate", field="ece",
           description="expected calibration error of the softmax on the validation split "
                       "(15 confidence bins; fraction)"),
    Metric(name="nll", direction="minimize", unit="nats", source="candidate", field="nll",
           description="negative log likelihood of the true class on the validation split"),
    Metric(name="brier", direction="minimize", unit="", source="candidate", field="brier",
           description="Brier score (squared error of the softmax) on the validation split"),
    Metric(name="bytes", direction="minimize", unit="B", source="candidate", field="bytes",
           description="artifact bytes"),
    Metric(name="params", direction="minimize", unit="", source="candidate", field="params",
           description="parameters"),
    Metric(name="macs", direction="minimize", unit="", source="candidate", field="macs",
           description="multiply-accumulates per sample"),
    Metric(name="latency_p50", direction="minimize", unit="ms", source="device", field="p50_ms",
           description="median latency of one run"),
    Metric(name="latency_p90", direction="minimize", unit="ms", source="device", field="p90_ms",
           description="90th percentile latency of one run"),
    Metric(name="latency_p99", direction="minimize", unit="ms", source="device", field="p99_ms",
           description="99th percentile latency of one run"),
    Metric(name="cpu_p50", direction="minimize", unit="ms", source="device", field="cpu_p50_ms",
           description="median CPU time of the measuring thread per run"),
    Metric(name="init_ms", direction="minimize", unit="ms", source="device", field="init_ms",
           description="model load: the runtime building the model from its files (a fresh load)"),
    Metric(name="memory_peak_mb", direction="minimize", unit="MiB", source="device",
           field="memory_peak_mb",
           description="peak resident memory of loading and running the model, above the agent's own"),
    Metric(name="energy", direction="minimize", unit="mJ", source="device",
           field="energy_per_inference_mj", energy_kind="measured",
           description="energy per run from a real sensor (every device of the class needs one)"),
    Metric(name="energy_simulated", direction="minimize", unit="mJ", source="device",
           field="energy_per_inference_mj", energy_kind="simulated",
           description="energy per run from a simulated sensor (a model, not a meter)"),
    Metric(name="energy_estimated", direction="minimize", unit="mJ", source="device",
           field="estimated_energy_mj", energy_kind="estimated",
           description="energy per run estimated from operation counts (not a measurement)"),
    Metric(name="energy_time_estimated", direction="minimize", unit="mJ", source="device",
           field="time_estimated_energy_mj", energy_kind="time_estimated",
           description="energy per run estimated from busy time x the device's stated power "
                       "(fleet file power:; not a measurement)"),
    Metric(name="energy_sensing", direction="minimize", unit="mJ", source="device",
           field="sensing_energy_mj", energy_kind="estimated", sensing=True,
           description="sensing energy per run: kept sensors' datasheet power x window (an estimate)"),
    Metric(name="energy_total", direction="minimize", unit="mJ", source="device",
           field="estimated_energy_mj", plus="sensing_energy_mj", energy_kind="estimated",
           sensing=True,
           description="estimated compute (operation counts) + estimated sensing energy per run"),
)}


def metric(name: str) -> Metric:
    """The metric called ``name``; KeyError naming the accepted names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; accepted: {', '.join(METRICS)}") from None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return None if math.isnan(v) else v


def candidate_value(name: str, candidate: Any) -> float | None:
    """The value of candidate metric ``name`` for ``candidate`` (a Candidate or a mapping)."""
    m = metric(name)
    if m.per_device:
        raise ValueError(f"{name} is measured on devices; use class_value")
    raw = candidate.get(m.field) if isinstance(candidate, Mapping) else getattr(candidate, m.field, None)
    return _number(raw)


def row_value(name: str, row: Mapping[str, Any]) -> float | None:
    """The value of device metric ``name`` in one results row, or None when the row does not
    count for it (failed, a drift-reference row, another energy kind, or not recorded)."""
    m = metric(name)
    if not m.per_device:
        raise ValueError(f"{name} is known from compression, not from results rows")
    if row.get("error") or row.get("reference"):
        return None
    if m.energy_kind in ("measured", "simulated") and row.get("energy_kind") != m.energy_kind:
        return None
    value = _number(row.get(m.field))
    if m.plus is not None:
        extra = _number(row.get(m.plus))
        return None if value is None or extra is None else value + extra
    return value


def backend_of(row: Mapping[str, Any]) -> str:
    """The runtime that measured ``row`` ("unknown" when the row does not say)."""
    return str(row.get("backend") or "unknown")


def device_values(name: str, rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """{(device, backend): median of its row values} over ``rows`` (rows of ONE artifact and
    class): a device measured with two runtimes has two values, never one pooled."""
    per_device: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        v = row_value(name, r)
        if v is not None:
            per_device.setdefault((str(r["device"]), backend_of(r)), []).append(v)
    return {key: statistics.median(vs) for key, vs in per_device.items()}


def _of_class(rows: Iterable[Mapping[str, Any]], device_class: str,
              artifact_hash: str | None) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("device_class") == device_class
            and (artifact_hash is None or r.get("artifact_hash") == artifact_hash)]


def _runs_by_backend(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """{backend: its devices, sorted} over the successful non-reference rows."""
    found: dict[str, set[str]] = {}
    for r in rows:
        if not r.get("error") and not r.get("reference"):
            found.setdefault(backend_of(r), set()).add(str(r["device"]))
    return {b: sorted(ds) for b, ds in sorted(found.items())}


def class_backend(rows: Iterable[Mapping[str, Any]], device_class: str,
                  artifact_hash: str | None = None) -> str | None:
    """The one backend the class's successful rows (of ``artifact_hash`` when given) ran, or
    None when they ran none or several."""
    found = _runs_by_backend(_of_class(rows, device_class, artifact_hash))
    return next(iter(found)) if len(found) == 1 else None


def backend_conflict(rows: Iterable[Mapping[str, Any]], device_class: str,
                     artifact_hash: str | None = None) -> str | None:
    """Why the class has no value: its devices measured (``artifact_hash``) with different
    backends, naming the devices of each and the fix; None when they ran one backend (or none)."""
    found = _runs_by_backend(_of_class(rows, device_class, artifact_hash))
    if len(found) < 2:
        return None
    what = f"artifact {artifact_hash[:12]}" if artifact_hash else "the artifact"
    runs = "; ".join(f"{b} on {', '.join(ds)}" for b, ds in found.items())
    return (f"class {device_class!r} measured {what} with different runtimes ({runs}) and a class "
            "value never pools runtimes: give the class's devices the same runtimes (install "
            "onnxruntime where it is missing, or list one runtime in the devices' `backends:` in "
            "the fleet file), or measure with one backend (measure.backend / --backend numpy)")


def class_value(name: str, rows: Iterable[Mapping[str, Any]], device_class: str,
                artifact_hash: str | None = None) -> float | None:
    """The class value of ``name`` on ``device_class`` (median over its devices' values) from
    ``rows`` (restricted to ``artifact_hash`` when given); None when no row counts, or when the
    class's devices ran different backends (:func:`backend_conflict` says why)."""
    mine = _of_class(rows, device_class, artifact_hash)
    if len(_runs_by_backend(mine)) > 1:
        return None
    values = device_values(name, mine)
    return statistics.median(values.values()) if values else None


def class_values(rows: Iterable[Mapping[str, Any]], artifact_hash: str
                 ) -> dict[tuple[str, str], float]:
    """{(metric, class): class value} of every device metric with a value for ``artifact_hash``."""
    mine = [r for r in rows if r.get("artifact_hash") == artifact_hash]
    out = {}
    for cls in sorted({str(r["device_class"]) for r in mine}):
        for name, m in METRICS.items():
            if m.per_device and (v := class_value(name, mine, cls)) is not None:
                out[(name, cls)] = v
    return out


def device_table(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (artifact_hash, device_class, device, backend): every device metric's
    device value (None when no row counts) and ``rows``, the successful non-reference rows
    behind them. The report's per-device and per-class tables are built from these records."""
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("error") or r.get("reference"):
            continue
        key = (str(r["artifact_hash"]), str(r["device_class"]), str(r["device"]), backend_of(r))
        groups.setdefault(key, []).append(r)
    out = []
    for (artifact, cls, device, backend), members in sorted(groups.items()):
        rec: dict[str, Any] = {"artifact_hash": artifact, "device_class": cls, "device": device,
                               "backend": backend, "rows": len(members)}
        for name, m in METRICS.items():
            if m.per_device:
                rec[name] = device_values(name, members).get((device, backend))
        out.append(rec)
    return out
