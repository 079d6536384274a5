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
  on a device that recorded no energy of that kind).

Values come from :mod:`deepfleet.metrics`, the one definition of every metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deepfleet import metrics
from deepfleet.candidate import Candidate
from deepfleet.search import _predictor as predictor
from deepfleet.search._spec import Constraint, Objective, StudySpec

__all__ = ["Failed", "Final", "Infeasible", "Measure", "PredictedInfeasible", "Prediction", "Tell",
           "Verdict", "judge", "prediction_errors"]

Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """A predicted class value, with the held-out relative error of the model that made it."""

    metric: str
    device_class: str
    value: float
    error: float
    points: int  # measured artifacts the model was fitted on


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


def _predict(spec: StudySpec, cand: Candidate, rows: Rows, classes: Sequence[str]) -> list[Prediction]:
    """Predictions of every device metric the study uses on ``classes``, from the rows of
    other artifacts (None where too few were measured to fit)."""
    wanted = {(x.metric, x.device_class) for x in (*spec.objectives, *spec.constraints)
              if x.device_class in classes}
    out = []
    for metric, cls in sorted(wanted, key=lambda t: (t[0], str(t[1]))):
        if metrics.metric(metric).sensing:
            continue  # it follows the sensors a model keeps, which its MACs and params do not say
        points = predictor.training_points([r for r in rows if r.get("artifact_hash") != cand.artifact_hash],
                                           str(cls), metric)
        fit = predictor.fit(points, metric)
        if fit is not None:
            out.append(Prediction(metric=metric, device_class=str(cls), value=fit.predict(cand.to_dict()),
                                  error=fit.loo_error, points=fit.points))
    return out


def judge(spec: StudySpec, candidate: Candidate, rows: Rows) -> Verdict:
    """The verdict on ``candidate`` given every results row measured so far (any artifact)."""
    known = {}
    for c in spec.constraints:
        if not metrics.metric(c.metric).per_device:
            v = metrics.candidate_value(c.metric, candidate)
            if v is not None:
                known[c.label] = v - c.max
    broken = tuple(label for label, v in known.items() if v > 0)
    if broken:
        return Infeasible(outcome="infeasible", broken=broken, reason=f"breaks {', '.join(broken)} before measurement",
                          **_unmeasured(spec, candidate, rows, (), known))
    mine = _mine(rows, candidate.artifact_hash)
    missing = tuple(cls for cls in spec.device_classes if not any(r.get("device_class") == cls for r in mine))
    if missing:
        predictions = _predict(spec, candidate, rows, missing)
        for c, p in ((c, p) for c in spec.constraints for p in predictions
                     if (p.metric, p.device_class) == (c.metric, c.device_class)):
            margin = predictor.margin_for(p.error)
            if p.value > c.max * (1 + margin):
                reason = (f"predicted {c.metric} on {p.device_class} = {p.value:.3g} breaks <= {c.max:g} by more "
                          f"than {100 * margin:.0f} % (predictor error {100 * p.error:.1f} %)")
                return PredictedInfeasible(outcome="predicted_infeasible", prediction=p, reason=reason,
                                           **_unmeasured(spec, candidate, rows, predictions, known))
        return Measure(classes=missing, predictions=tuple(predictions))
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
