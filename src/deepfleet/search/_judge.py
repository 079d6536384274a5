"""The judge: what a candidate's known values, the rows measured so far and the predictor decide.

:func:`judge` is a pure function of plain data (the study spec, a
:class:`~deepfleet.candidate.Candidate`, results rows as dicts) and returns one verdict:

* :class:`Infeasible`: a constraint that compression already settles is broken (accuracy drop,
  bytes, ...): told to Optuna at once, no device time;
* :class:`PredictedInfeasible`: a device constraint is predicted broken by more than the
  predictor's margin: told at once, no device time;
* :class:`Measure`: measure on these classes (with the predictions made, to score the
  predictor once the measurement is in);
* :class:`Tell`: every value is known (measured rows for every class the study needs);
* :class:`Failed`: the rows are in but a value cannot be had from them (e.g. an energy objective
  on a device that recorded no energy of that kind), or they cannot be compared with the
  study's other values: a class whose devices ran this artifact in different runtimes, or in
  another runtime than the class's first measured candidate (values of numpy and onnxruntime
  are never pooled, nor ranked against each other).

Values come from :mod:`deepfleet.metrics`, the one definition of every metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepfleet import metrics
from deepfleet.candidate import Candidate
from deepfleet.features import complete
from deepfleet.search import _predictor as predictor
from deepfleet.search._spec import Constraint, Objective, StudySpec

__all__ = ["Failed", "Final", "Infeasible", "Measure", "PredictedInfeasible", "Prediction", "Tell",
           "Verdict", "fit", "judge", "prediction_errors", "predictor_status"]

Rows = Sequence[Mapping[str, Any]]
Known = Mapping[str, Candidate]


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """A predicted class value, labelled: the held-out relative error of the model that made it,
    how many measured artifacts it was fitted on, which predictor, and where its data came from
    (``own`` or borrowed from other classes: cold start)."""

    metric: str
    device_class: str
    value: float
    error: float
    points: int
    predictor: str
    source: str


@dataclass(frozen=True, kw_only=True)
class Final:
    """A verdict that ends the trial: the values to tell Optuna (objective order), every
    constraint's ``value - max`` by label (<= 0 is feasible), where the values come from
    (``measured``: every device value measured; ``predicted``/``placeholder``: some objective
    was not measured), the outcome recorded in the candidates table and a reason."""

    values: tuple[float, ...]
    constraints: dict[str, float]
    source: str
    outcome: str
    reason: str | None = None
    predictions: tuple[Prediction, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Infeasible(Final):
    broken: tuple[str, ...] = ()  # labels of the broken constraints


@dataclass(frozen=True, kw_only=True)
class PredictedInfeasible(Final):
    prediction: Prediction | None = None  # the one that broke its constraint
    label: str = ""  # the constraint it broke
    classes: tuple[str, ...] = ()  # the classes a measurement would need (to audit the rejection)


@dataclass(frozen=True, kw_only=True)
class Tell(Final):
    pass


@dataclass(frozen=True, kw_only=True)
class Measure:
    """Measure the candidate on ``classes``; ``predictions`` are kept to score the predictor."""

    classes: tuple[str, ...]
    predictions: tuple[Prediction, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class Failed:
    reason: str


Verdict = Infeasible | PredictedInfeasible | Measure | Tell | Failed


def _mine(rows: Rows, artifact: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("artifact_hash") == artifact and not r.get("error") and not r.get("reference")]


def _value(metric: str, device_class: str | None, cand: Candidate, mine: Rows) -> float | None:
    if metrics.metric(metric).per_device:
        return metrics.class_value(metric, mine, device_class or "")
    return metrics.candidate_value(metric, cand)


def _placeholder(o: Objective, rows: Rows) -> float:
    """A value for an objective that was not measured: the worst seen on its class, doubled
    (1e6 before anything was seen). Such trials are infeasible and never on the front."""
    seen = [v for r in rows if r.get("device_class") == o.device_class
            and (v := metrics.row_value(o.metric, r)) is not None]
    if o.direction == "maximize":
        return 0.5 * min(seen) if seen else 0.0
    return 2 * max(seen) if seen else 1e6


def _unmeasured(spec: StudySpec, cand: Candidate, rows: Rows, predictions: Sequence[Prediction],
                known: dict[str, float]) -> dict[str, Any]:
    """Values and constraints for a trial ended without (complete) measurement."""
    mine = _mine(rows, cand.artifact_hash)
    predicted = {(p.metric, p.device_class): p.value for p in predictions}
    values, source = [], "predicted"
    for o in spec.objectives:
        v = _value(o.metric, o.device_class, cand, mine)
        if v is None:
            v = predicted.get((o.metric, o.device_class or ""))
        if v is None:
            v, source = _placeholder(o, rows), "placeholder"
        values.append(v)
    constraints = {c.label: known.get(c.label, predicted.get((c.metric, c.device_class or ""), c.max) - c.max)
                   for c in spec.constraints}
    return {"values": tuple(values), "constraints": constraints, "source": source,
            "predictions": tuple(predictions)}


def _backend(rows: Rows, device_class: str) -> str | None:
    """The backend the class's devices measured with most often (rows of one backend train a
    predictor for that backend only)."""
    seen = [str(r["backend"]) for r in rows if r.get("device_class") == device_class and r.get("backend")
            and not r.get("error") and not r.get("reference")]
    return max(sorted(set(seen)), key=seen.count) if seen else None


def fit(spec: StudySpec, rows: Rows, known: Known, metric: str, device_class: str,
        exclude: str | None = None) -> tuple[predictor.Fit | None, int]:
    """The study's predictor of ``metric`` on ``device_class`` fitted on the rows of every
    artifact but ``exclude`` (borrowing from the other classes while the class has few), and
    how many artifacts of the class it could use."""
    features = {h: c.features for h, c in known.items() if complete(c.features) and h != exclude}
    points, backends = {}, {}
    for cls in sorted({str(r["device_class"]) for r in rows}):
        backends[cls] = _backend(rows, cls)
        pts = predictor.training_points(rows, cls, metric, features, backends[cls])
        if pts:
            points[cls] = pts
    own = points.pop(device_class, [])
    # borrow from classes measured in the same runtime when there are such: another runtime's
    # costs differ by op kind, not by one scale (benchmarks/predictor.py: cold-start Spearman
    # 0.99 borrowing from the same runtime, 0.84 with a numpy class pooled in)
    same = {c: p for c, p in points.items() if backends[c] == backends.get(device_class)}
    return predictor.fit_class(spec.judging.predictor, own, same or points), len(own)


def _predict(spec: StudySpec, cand: Candidate, rows: Rows, known: Known,
             classes: Sequence[str]) -> list[Prediction]:
    """Predictions of every device metric the study uses on ``classes`` (none where the
    predictor has too few points)."""
    if not complete(cand.features):
        return []
    wanted = {(x.metric, str(x.device_class)) for x in (*spec.objectives, *spec.constraints)
              if x.device_class in classes}
    out = []
    for metric, cls in sorted(wanted):
        if metrics.metric(metric).sensing:
            continue  # it follows the sensors a model keeps, which its MACs and params do not say
        f, _ = fit(spec, rows, known, metric, cls, exclude=cand.artifact_hash)
        if f is not None:
            out.append(Prediction(metric=metric, device_class=cls, value=f.predict(cand.features), error=f.error,
                                  points=f.points, predictor=f.name, source=f.source))
    return out


def judge(spec: StudySpec, candidate: Candidate, rows: Rows, known: Known | None = None) -> Verdict:
    """The verdict on ``candidate`` given every results row measured so far (any artifact) and
    the candidates ``known`` so far by artifact hash (their features train the predictor)."""
    known = known or {}
    known_values = {}
    for c in spec.constraints:
        if not metrics.metric(c.metric).per_device:
            v = metrics.candidate_value(c.metric, candidate)
            if v is not None:
                known_values[c.label] = v - c.max
    broken = tuple(label for label, v in known_values.items() if v > 0)
    if broken:
        return Infeasible(outcome="infeasible", broken=broken, reason=f"breaks {', '.join(broken)} before measurement",
                          **_unmeasured(spec, candidate, rows, (), known_values))
    mine = _mine(rows, candidate.artifact_hash)
    missing = tuple(cls for cls in spec.device_classes if not any(r.get("device_class") == cls for r in mine))
    if missing:
        predictions = _predict(spec, candidate, rows, known, missing)
        for c, p in ((c, p) for c in spec.constraints for p in predictions
                     if (p.metric, p.device_class) == (c.metric, c.device_class)):
            margin = predictor.margin_for(p.error)
            if p.value > c.max * (1 + margin):
                reason = (f"predicted {c.metric} on {p.device_class} = {p.value:.3g} breaks <= {c.max:g} by more "
                          f"than {100 * margin:.0f} % ({p.predictor} predictor, held-out error {100 * p.error:.1f} %)")
                return PredictedInfeasible(outcome="predicted_infeasible", prediction=p, reason=reason,
                                           label=c.label, classes=missing,
                                           **_unmeasured(spec, candidate, rows, predictions, known_values))
        return Measure(classes=missing, predictions=tuple(predictions))
    problem = _backend_problem(spec, candidate.artifact_hash, rows)
    if problem is not None:
        return Failed(reason=problem)
    values = []
    for o in spec.objectives:
        v = _value(o.metric, o.device_class, candidate, mine)
        if v is None:
            return Failed(reason=_no_value(o, mine))
        values.append(v)
    constraints = {}
    for c in spec.constraints:
        v = _value(c.metric, c.device_class, candidate, mine)
        if v is None:
            return Failed(reason=_no_value(c, mine))
        constraints[c.label] = v - c.max
    return Tell(values=tuple(values), constraints=constraints, source="measured", outcome="measured")


def _backend_problem(spec: StudySpec, artifact: str, rows: Rows) -> str | None:
    """Why this artifact's device values cannot be used: on a class, its devices ran different
    runtimes, or another runtime than the class's earliest measured artifact of the study (the
    runtime the study's values of that class are in). None when they can."""
    mine = _mine(rows, artifact)
    for cls in spec.device_classes:
        conflict = metrics.backend_conflict(mine, cls)
        if conflict is not None:
            return conflict
        this = metrics.class_backend(mine, cls)
        earlier = sorted((r for r in rows if r.get("device_class") == cls and r.get("artifact_hash") != artifact
                          and not r.get("error") and not r.get("reference")),
                         key=lambda r: str(r.get("started_at") or ""))
        if this is None or not earlier or metrics.backend_of(earlier[0]) == this:
            continue
        first = earlier[0]
        devices = sorted({str(r["device"]) for r in mine if r.get("device_class") == cls})
        return (f"class {cls!r}: this candidate ran {this} on {', '.join(devices)}, but the study's values on "
                f"{cls!r} are in {metrics.backend_of(first)} (first measured on {first['device']}); runtimes are "
                "never compared: give the class's devices the same runtimes (install onnxruntime where it is "
                "missing, or list one runtime in the devices' `backends:` in the fleet file) or set measure.backend")
    return None


def _no_value(x: Objective | Constraint, mine: Rows) -> str:
    devices = sorted({str(r["device"]) for r in mine if r.get("device_class") == x.device_class})
    m = metrics.metric(x.metric)
    return (f"{x.metric} on class {x.device_class} has no value: device(s) {', '.join(devices)} recorded no "
            f"{m.description}; choose a metric the devices can give (e.g. energy_estimated)")


def prediction_errors(predictions: Sequence[Prediction], candidate: Candidate, rows: Rows
                      ) -> list[tuple[Prediction, float]]:
    """(prediction, relative error against the measured class value) for each prediction
    whose class value is now measured."""
    mine = _mine(rows, candidate.artifact_hash)
    out = []
    for p in predictions:
        actual = metrics.class_value(p.metric, mine, p.device_class)
        if actual:
            out.append((p, abs(p.value - actual) / abs(actual)))
    return out


def predictor_status(spec: StudySpec, rows: Rows, known: Known) -> dict[str, dict[str, str]]:
    """{class: {metric: one line}}: how the predictor of each device metric the study uses
    stands on each class (its model, points, held-out error and data source, or why it cannot
    predict yet)."""
    out: dict[str, dict[str, str]] = {}
    # a metric both objective and constraint on a class is fitted once
    for metric, cls in sorted({(x.metric, x.device_class) for x in (*spec.objectives, *spec.constraints)
                               if x.device_class}):
        f, own = fit(spec, rows, known, metric, cls)
        out.setdefault(cls, {})[metric] = predictor.describe(f, own)
    return out
