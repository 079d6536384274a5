from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from deepfleet.errors import ConfigError
from deepfleet.search import apply_params, counts, finished, open_study, pareto, suggest
from deepfleet.search._spec import parse_study

RAW = {"name": "s", "model": "mlp", "data": "digits", "trials": 4,
       "space": {"method": ["deepiot", "deepiot+fixedpoint"], "deepiot.target": {"low": 0.01, "high": 0.1, "log": True},
                 "fixedpoint.bits": {"low": 4, "high": 8}, "deepiot.iterations": 100}}


def test_new_study_refuses_to_reuse_and_resume_needs_one(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    spec = parse_study(RAW)
    with pytest.raises(ConfigError, match="no study named 's'"):
        open_study(spec, storage, resume=True)
    open_study(spec, storage, resume=False)
    with pytest.raises(ConfigError, match="--resume"):
        open_study(spec, storage, resume=False)


def test_resume_requeues_trials_a_dead_driver_left_running(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    spec = parse_study(RAW)
    study = open_study(spec, storage, resume=False).study
    done = study.ask()
    p_done = suggest(done, spec.space)
    study.tell(done, [0.9, 1000.0])
    left = study.ask()  # the driver "dies" here: trial stays RUNNING
    p_left = suggest(left, spec.space)
    opened = open_study(spec, storage, resume=True)
    study2 = opened.study
    assert opened.requeued == [dict(left.params)] and opened.session == 1
    assert [t.number for t in finished(study2)] == [0]  # the interrupted one does not count
    states = {t.number: t.state for t in study2.trials}
    assert states[left.number] == optuna.trial.TrialState.FAIL
    assert counts(study2) == {"complete": 1, "failed": 0, "interrupted": 1, "running": 0, "waiting": 1}
    # what plain Optuna sees: the objectives' names and the interrupted trial's number
    plain = optuna.load_study(study_name="s", storage=storage)
    assert plain.metric_names == ["accuracy", "bytes"] and plain.user_attrs["interrupted"] == [left.number]
    again = study2.ask()  # the requeued trial comes back with the same parameters
    assert suggest(again, spec.space) == p_left
    assert p_done  # the finished trial kept its own parameters
    assert again.params == left.params


def test_suggest_covers_choice_range_int_and_fixed() -> None:
    spec = parse_study(RAW)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = [suggest(study.ask(), spec.space) for _ in range(20)]
    assert {p["method"] for p in drawn} == {"deepiot", "deepiot+fixedpoint"}
    for params in drawn:
        assert 0.01 <= params["deepiot.target"] <= 0.1
        assert params["deepiot.iterations"] == 100
        assert apply_params(params)["deepiot"]["iterations"] == 100
        # conditional: bit widths only where the pipeline quantises
        if params["method"] == "deepiot+fixedpoint":
            assert isinstance(params["fixedpoint.bits"], int) and 4 <= params["fixedpoint.bits"] <= 8
        else:
            assert "fixedpoint.bits" not in params


def test_pareto_excludes_infeasible_trials() -> None:
    study = optuna.create_study(direction="maximize")
    for value, violation in ((0.99, 1.0), (0.95, -0.1), (0.90, 0.0)):
        t = study.ask()
        t.set_constraint("c", violation)
        study.tell(t, value)
    assert [t.values[0] for t in pareto(study)] == [0.95]


def test_each_session_seeds_its_sampler_differently(tmp_path: Path) -> None:
    """A resumed study must not replay the first session's random draws."""
    storage = f"sqlite:///{tmp_path}/s.db"
    spec = parse_study({**RAW, "sampler": "random"})
    first = open_study(spec, storage, resume=False).study
    drawn = []
    for _ in range(3):
        t = first.ask()
        drawn.append(suggest(t, spec.space))
        first.tell(t, [0.9, 1.0])
    second = open_study(spec, storage, resume=True).study
    again = [suggest(second.ask(), spec.space) for _ in range(3)]
    assert not [p for p in again if p in drawn]
