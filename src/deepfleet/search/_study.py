"""The Optuna study of a search: creation, resume, suggestions, results.

The driver owns each trial's lifetime through ``ask()``/``tell()``; this module only talks to
Optuna (no sockets, no training).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from deepfleet.errors import ConfigError
from deepfleet.search._spec import Param, StudySpec

INTERRUPTED = "interrupted: the driver stopped before this trial finished; it is run again on --resume"


def make_sampler(spec: StudySpec, session: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (multi-objective capable, constant liar for parallel asks), NSGA-II or random.

    The seed is the study's seed plus the session number (0 for the first run, +1 for each
    ``--resume``): a sampler seeded the same way on every start would replay its first random
    draws and spend trials on settings the study already finished.
    """
    seed = (spec.sampler_seed if spec.sampler_seed is not None else spec.seed) + session
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, spec.parallelism * 2))
    # few trials: start the model after a quarter of the budget rather than Optuna's fixed 10
    startup = max(3, min(10, spec.trials // 4))
    # group: a method's settings exist only in trials that chose the method (conditional space)
    with warnings.catch_warnings():  # multivariate and group are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True,
                                          multivariate=True, group=True)


@dataclass(frozen=True)
class Opened:
    """An opened study: the study, this session's number (0: first run), and the parameters of
    the trials a dead driver left running (marked interrupted, queued to run again)."""

    study: optuna.Study
    session: int
    requeued: list[dict[str, Any]]


def open_study(spec: StudySpec, storage: str, *, resume: bool) -> Opened:
    """Create the study, or with ``resume`` load it and requeue trials a dead driver left running.

    Refuses to silently reuse an existing study without ``resume`` and to resume one that does
    not exist. Records the objectives' names (``study.metric_names``), the session count and
    the numbers of interrupted trials in the study itself (public Optuna API only), so plain
    Optuna and optuna-dashboard see what deepfleet sees.
    """
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL
        raise ConfigError(f"cannot open Optuna storage {storage!r}: {exc}; give an SQLAlchemy URL such as sqlite:///study.db") from None
    exists = spec.name in names
    if exists and not resume:
        raise ConfigError(
            f"study {spec.name!r} already exists in {storage}; rerun with --resume to continue it, "
            "or change 'name' in the study file to start a new one"
        )
    if resume and not exists:
        raise ConfigError(f"--resume: no study named {spec.name!r} in {storage}; run once without --resume first")
    directions = spec.directions
    study = optuna.create_study(
        study_name=spec.name, storage=storage, load_if_exists=resume,
        directions=directions if len(directions) > 1 else None,
        direction=directions[0] if len(directions) == 1 else None,
    )
    if resume and [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"study {spec.name!r} in {storage} was created with objectives in directions "
            f"{[d.name.lower() for d in study.directions]}, but the study file now asks for {directions}"
        )
    labels = [o.label for o in spec.objectives]
    if study.metric_names is None:
        with warnings.catch_warnings():  # marked experimental since Optuna 3.2, still the way
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(labels)
    elif list(study.metric_names) != labels:
        raise ConfigError(f"study {spec.name!r} in {storage} was created with objectives {study.metric_names}, "
                          f"but the study file now asks for {labels}; use a new 'name' for new objectives")
    session = int(study.user_attrs.get("sessions", 0))
    study.set_user_attr("sessions", session + 1)
    study.sampler = make_sampler(spec, session)
    requeued, interrupted = [], list(study.user_attrs.get("interrupted", []))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        interrupted.append(t.number)
        requeued.append(dict(t.params))
        study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number}, skip_if_exists=False)
    if interrupted:
        study.set_user_attr("interrupted", interrupted)
    return Opened(study, session, requeued)


def suggest(trial: Trial, space: tuple[Param, ...]) -> dict[str, Any]:
    """Parameters of one candidate: suggested for choices and ranges, copied for fixed values.

    ``method`` comes first; a ``M.setting`` is suggested only when method M is in the chosen
    pipeline (a conditional space: 4-bit vs 8-bit means nothing to a DeepIoT-only trial).
    """
    from deepfleet.compressors import parse_methods

    ordered = sorted(space, key=lambda p: p.name != "method")
    params: dict[str, Any] = {}
    for p in ordered:
        if p.name != "method":
            if p.name.partition(".")[0] not in parse_methods(str(params["method"])):
                continue
        params[p.name] = _suggest_one(trial, p)
    return params


def _suggest_one(trial: Trial, p: Param) -> Any:
    if p.fixed:
        return p.value
    if p.choices is not None:
        return trial.suggest_categorical(p.name, list(p.choices))
    if p.integer:
        return trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))  # type: ignore[arg-type]
    return trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)  # type: ignore[arg-type]


def interrupted(study: optuna.Study) -> set[int]:
    """Numbers of the trials a stopped driver left unfinished (each was queued again)."""
    return set(study.user_attrs.get("interrupted", []))


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count against the budget: complete, or failed for a reason other than a stop."""
    stopped = interrupted(study)
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in stopped)]


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by how they ended: complete, failed, interrupted (and re-run), running, waiting."""
    stopped = interrupted(study)
    out = {"complete": 0, "failed": 0, "interrupted": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL:
            out["interrupted" if t.number in stopped else "failed"] += 1
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            out["complete"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        else:
            out["waiting"] += 1
    return out


def pareto(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible non-dominated trials (for one objective: the best feasible trial), measured ones
    only: a trial told predicted values (``values_source``) is never on the front."""
    def measured(t: FrozenTrial) -> bool:
        return t.user_attrs.get("values_source", "measured") == "measured"

    if len(study.directions) > 1:
        return [t for t in study.best_trials if measured(t)]
    feasible = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if all(v <= 0 for v in t.constraints.values()) and measured(t)
    ]
    if not feasible:
        return []
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    return [min(feasible, key=lambda t: sign * t.values[0])]


def trial_record(t: FrozenTrial, labels: list[str]) -> dict[str, Any]:
    """Plain data about a finished trial for printing and JSON."""
    rec: dict[str, Any] = {"trial": t.number, "state": t.state.name, "params": dict(t.params),
                           "constraints": dict(t.constraints)}
    if t.values is not None:
        rec["values"] = dict(zip(labels, t.values))
    rec.update({k: v for k, v in t.user_attrs.items() if k in ("artifact", "fail_reason", "values_source", "accuracy_test")})
    return rec


def apply_params(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Split flat ``method.setting`` parameters into per-method settings: {'deepiot': {...}}."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        if key == "method":
            continue
        method, _, setting = key.partition(".")
        out.setdefault(method, {})[setting] = value
    return out
