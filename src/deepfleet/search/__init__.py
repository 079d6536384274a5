"""The search: what a study asks for, and Optuna's side of it.

Pure pieces first (no Ray, no sockets, no training): the study file (:func:`load_study`,
:class:`StudySpec`), the conditional search space (:func:`suggest`), and the Optuna study's
lifetime (:func:`open_study`, :func:`pareto`). The driver in :mod:`deepfleet.orchestrator` owns
each trial through ``ask()``/``tell()`` and calls these.

``DEMO_STUDY`` is the packaged study file behind ``deepfleet demo``.
"""

from __future__ import annotations

from pathlib import Path

from deepfleet.search._spec import (
    METRICS,
    Constraint,
    Objective,
    Param,
    Resources,
    StudyMeasure,
    StudySpec,
    load_study,
    parse_study,
)
from deepfleet.search._study import (
    apply_params,
    finished,
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
    "Objective",
    "Param",
    "Resources",
    "StudyMeasure",
    "StudySpec",
    "apply_params",
    "finished",
    "load_study",
    "open_study",
    "parse_study",
    "pareto",
    "suggest",
    "trial_record",
]
