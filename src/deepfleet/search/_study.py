"""The Optuna study of a search: creation, resume, suggestions, results.

The driver owns each trial's lifetime through ``ask()``/``tell()``; this module only talks to
Optuna (no sockets, no training).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from deepfleet.errors import ConfigError
from deepfleet.search._spec import Param, StudySpec

INTERRUPTED = "interrupted: the driver stopped before this trial finished; it is run again on --resume"


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """TPE (multi-objective capable, constant liar for parallel asks), NSGA-II or random."""
    seed = spec.sampler_seed if spec.sampler_seed is not None else spec.seed
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


def open_study(spec: StudySpec, storage: str, *, resume: bool) -> tuple[optuna.Study, list[dict[str, Any]]]:
    """Create the study, or with ``resume`` load it and requeue trials a dead driver left running.

    Returns (study, parameters of the requeued trials). Refuses to silently reuse an existing
    study without ``resume`` and to resume one that does not exist.
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
        study_name=spec.name, storage=storage, sampler=make_sampler(spec), load_if_exists=resume,
        directions=directions if len(directions) > 1 else None,
        direction=directions[0] if len(directions) == 1 else None,
    )
    if resume and [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"study {spec.name!r} in {storage} was created with objectives in directions "
            f"{[d.name.lower() for d in study.directions]}, but the study file now asks for {directions}"
        )
    requeued = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            requeued.append(dict(t.params))
            study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number}, skip_if_exists=False)
    return study, requeued


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


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count against the budget: complete, or failed for a reason other than a stop."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE or t.state == TrialState.PRUNED:
            out.append(t)
        elif t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED:
            out.append(t)
    return out


def pareto(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible non-dominated trials (for one objective: the best feasible trial)."""
    if len(study.directions) > 1:
        return list(study.best_trials)
    feasible = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if all(v <= 0 for v in t.constraints.values())
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
