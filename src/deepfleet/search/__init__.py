"""The search: what a study asks for, and Optuna's side of it.

Pure pieces (no Ray, no sockets, no training): the study file (:func:`load_study`,
:class:`StudySpec`), the conditional search space (:func:`suggest`), the judge that turns a
candidate and the rows measured so far into a verdict (:func:`judge`), and the Optuna study's
lifetime (:func:`open_study`, :func:`pareto`, :func:`counts`). The scheduler in
:mod:`deepfleet.orchestrator.search_driver` owns each trial through ``ask()``/``tell()`` and
calls these.

``DEMO_STUDY`` is the packaged study file behind ``deepfleet demo``.
"""

from __future__ import annotations

from pathlib import Path

from deepfleet.search._judge import (
    Failed,
    Infeasible,
    Measure,
    PredictedInfeasible,
    Prediction,
    Tell,
    Verdict,
    judge,
    prediction_errors,
    predictor_status,
)
from deepfleet.search._spec import (
    METRICS,
    Constraint,
    Objective,
    Param,
    Resources,
    StudyMeasure,
    StudySpec,
    check_fleet,
    check_sensing,
    load_study,
    parse_study,
)
from deepfleet.search._study import (
    Opened,
    apply_params,
    counts,
    finished,
    interrupted,
    open_study,
    pareto,
    suggest,
    trial_record,
)

DEMO_STUDY = Path(__file__).with_name("demo.yaml")

__all__ = [
    "DEMO_STUDY",
    "METRICS",
    "Constraint",
    "Failed",
    "Infeasible",
    "Measure",
    "Objective",
    "Opened",
    "Param",
    "PredictedInfeasible",
    "Prediction",
    "Resources",
    "StudyMeasure",
    "StudySpec",
    "Tell",
    "Verdict",
    "apply_params",
    "check_fleet",
    "check_sensing",
    "counts",
    "finished",
    "interrupted",
    "judge",
    "load_study",
    "open_study",
    "parse_study",
    "pareto",
    "prediction_errors",
    "predictor_status",
    "suggest",
    "trial_record",
]
