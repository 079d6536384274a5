"""The search's scheduler: Optuna ask/tell in the driver, training on Ray workers, measuring on
devices, the judge deciding in between.

One trial: ask -> train (a Ray task) -> judge -> (measure on the classes the judge names ->
judge again) -> tell. The judge (:func:`deepfleet.search.judge`) is pure: this module only
schedules jobs, writes what they return and tells Optuna. Training of later trials overlaps the
measurement of earlier ones. Every row is written by the device actors as it is measured.

Run directory::

    RUN_DIR/study.db  artifacts/<sha256>/  results/  candidates/  trained/  summary.json
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from deepfleet.api import BaseSpec
from deepfleet.artifact import save_artifact
from deepfleet.candidate import Candidate
from deepfleet.errors import ConfigError, one_line
from deepfleet.orchestrator import _session
from deepfleet.orchestrator.broker import BrokerActor, measure_on_class
from deepfleet.orchestrator.candidates import candidate_row, known_candidates, write_candidates
from deepfleet.orchestrator.device_actor import start_device_actors
from deepfleet.orchestrator.fleet import Fleet
from deepfleet.orchestrator.progress import SearchProgress, settings_line
from deepfleet.orchestrator.raycluster import driver_node_id, start_ray
from deepfleet.orchestrator.results import plain_rows, read_results
from deepfleet.orchestrator.trainer import Trained, TrainJob, train_base, train_candidate
from deepfleet.search import (
    StudySpec,
    finished,
    judge,
    open_study,
    prediction_errors,
    predictor_status,
    suggest,
)
from deepfleet.search._judge import Failed, Final, Measure, PredictedInfeasible, Prediction

__all__ = ["Search"]


class JobKind(enum.Enum):
    BASE = "training the original model"
    TRAIN = "training"
    MEASURE = "measuring"
    BASELINE = "measuring the original model"


@dataclass(frozen=True)
class Job:
    kind: JobKind
    trial: int | None = None
    device_class: str | None = None


@dataclass
class Live:
    """A trial between ask and tell."""

    trial: optuna.Trial
    params: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    candidate: Candidate | None = None
    waiting: set[str] = field(default_factory=set)  # classes still being measured
    errors: list[str] = field(default_factory=list)
    predictions: tuple[Prediction, ...] = ()
    audit: str | None = None  # the constraint a prediction said it breaks, measured to check


class Search:
    """One session of a study; ``run()`` returns the summary (also saved as summary.json).

    Raises ConfigError before anything is written for a study the fleet cannot serve."""

    def __init__(self, spec: StudySpec, *, run_dir: Path, address: str | None = None,
                 storage: str | None = None, resume: bool = False, trials: int | None = None,
                 fleet: str | None = None, progress: bool = True):
        self.spec = spec
        # absolute: Ray workers (on other nodes, or started by `ray start` elsewhere) do not
        # share the driver's working directory, and artifact paths travel to them
        self.run_dir = Path(run_dir).resolve()
        self.address = address
        self.storage = storage or spec.storage or f"sqlite:///{self.run_dir / 'study.db'}"
        self.resume = resume
        self.budget = trials or spec.trials
        self.fleet: Fleet = _session.resolve_fleet(spec, fleet)
        self.devices = _session.check_fleet(spec, self.fleet)
        self.view = SearchProgress(spec, self.budget, enabled=progress)
        self.rows: list[dict[str, Any]] = []  # every results row of this study (Parquet is the truth)
        self.known: dict[str, Candidate] = {}  # candidates by artifact hash: the predictor's features
        self.pending: dict[Any, Job] = {}
        self.live: dict[int, Live] = {}
        self.tally = _session.Tally()

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        spec = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        opened = open_study(spec, self.storage, resume=self.resume)
        study = opened.study
        resources = start_ray(self.address)
        node = driver_node_id()
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        self.broker = BrokerActor.options(scheduling_strategy=strategy).remote(
            [{"name": d.name, "device_class": d.device_class} for d in self.devices])
        self.actors = start_device_actors(self.devices, str(self.run_dir / "results"), spec.name, node,
                                          _session.measure_settings(spec))
        if (self.run_dir / "results").is_dir():
            self.rows = plain_rows(read_results(self.run_dir / "results", study=spec.name))
        self.known = known_candidates(self.run_dir / "candidates", spec.name)
        # audits draw from their own stream: resumed sessions draw anew, runs repeat
        self.audits = random.Random(f"{spec.name}/{spec.seed}/{opened.session}")
        self.trainer = ray.remote(train_candidate).options(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu,
                                                          max_retries=0)
        self.base: Trained | None = None
        base_job = self._job()
        self.pending[ray.remote(train_base).options(num_cpus=spec.resources.cpu, max_retries=0)
                     .remote(base_job)] = Job(JobKind.BASE)
        self.view.event(f"original model {spec.model} on {spec.data}: training (or from the cache)")
        for params in opened.requeued:
            self.view.event(f"resume: running again the interrupted trial with {params}")
        try:
            while True:
                self._ask_more(study)
                if not self.pending:  # a live trial always waits on a job: all are told
                    break
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    self._done(self.pending.pop(ref), ref, study)
                self.view.update(self._state(study))
        finally:
            self.view.close()
        status = ray.get(self.broker.status.remote()) if self.devices else {}
        for a in self.actors.values():
            a.close.remote()
        return self.tally.summary(self, study, opened.session, status, resources)

    def _job(self, params: dict[str, Any] | None = None) -> TrainJob:
        s = self.spec
        return TrainJob(model=s.model, data=s.data, seed=s.seed, params=params or {}, training=s.training,
                        base=BaseSpec(checkpoint=s.base_checkpoint, epochs=s.base_epochs),
                        threads=max(1, int(s.resources.cpu)))

    def _ask_more(self, study: optuna.Study) -> None:
        """Start trials while the budget and the parallelism allow (after the original is in)."""
        training = sum(1 for j in self.pending.values() if j.kind is JobKind.TRAIN)
        while self.base and len(finished(study)) + len(self.live) < self.budget and training < self.spec.parallelism:
            trial = study.ask()
            t = Live(trial, suggest(trial, self.spec.space))
            self.live[trial.number] = t
            reused = _session.recalled_training(self.run_dir, self.spec, t.params)
            if reused is not None:
                self.view.event(f"trial {trial.number}: training reused from an earlier run")
                t.candidate = reused
                self._judge(t, study)
            else:
                self.pending[self.trainer.remote(self._job(t.params))] = Job(JobKind.TRAIN, trial.number)
                training += 1
                self.view.event(f"trial {trial.number}: training {settings_line(t.params)}")

    def _done(self, job: Job, ref: Any, study: optuna.Study) -> None:
        try:
            out = ray.get(ref)
        except Exception as exc:  # a trial's failure must not end the study
            if job.kind is JobKind.BASE:
                raise ConfigError(f"{self.spec.source}: the original model could not be trained: {one_line(exc)}") from None
            if job.trial is not None:
                self._fail(self.live.pop(job.trial), one_line(exc), study)
            return
        if job.kind is JobKind.BASE:
            self._base_ready(out)
        elif job.kind is JobKind.BASELINE:
            self.rows += out["rows"]
        elif job.kind is JobKind.TRAIN:
            t = self.live[job.trial]  # type: ignore[index]
            t.candidate = self.known[out.candidate.artifact_hash] = out.candidate
            save_artifact(self.run_dir / "artifacts", out.artifact)
            self.tally.trained(out.candidate.train_seconds or 0.0)
            _session.remember_training(self.run_dir, self.spec, t.params, out.candidate)
            self._judge(t, study)
        else:
            t = self.live[job.trial]  # type: ignore[index]
            self.rows += out["rows"]
            t.errors += out["errors"]
            t.waiting.discard(str(job.device_class))
            if not t.waiting:
                self._judge(t, study)

    def _base_ready(self, base: Trained) -> None:
        """Write the original's artifact and candidate row once per study; measure it once per
        class (it is every report's reference point)."""
        self.base = base
        art = save_artifact(self.run_dir / "artifacts", base.artifact)
        c = base.candidate
        self.view.event(f"original model: validation accuracy {c.accuracy_val:.4f}"
                        + (" (cached)" if base.cached else ""))
        if c.artifact_hash not in self.known:  # once per study
            write_candidates(self.run_dir / "candidates", [candidate_row(
                study=self.spec.name, kind="baseline", outcome="baseline", candidate=c)])
            self.known[c.artifact_hash] = c
        for cls in sorted({d.device_class for d in self.devices}):
            if any(r["artifact_hash"] == c.artifact_hash and r["device_class"] == cls and not r.get("error")
                   for r in self.rows):
                continue  # measured by an earlier session
            job = {"device_class": cls, "devices": 1, "holder": "original", "trial": None, "artifact": str(art.path)}
            self.pending[measure_on_class.remote(self.broker, self.actors, job)] = Job(JobKind.BASELINE, None, cls)

    def _judge(self, t: Live, study: optuna.Study) -> None:
        assert t.candidate is not None
        if t.errors:
            self._fail(t, "; ".join(t.errors), study)
            return
        verdict = judge(self.spec, t.candidate, self.rows, self.known)
        if isinstance(verdict, PredictedInfeasible) and self.audits.random() < self.spec.judging.audit_rejections:
            self.view.event(f"trial {t.trial.number}: {verdict.reason}; measured anyway (audit)")
            t.audit = verdict.label
            verdict = Measure(classes=verdict.classes, predictions=verdict.predictions)
        if isinstance(verdict, Measure):
            t.predictions = verdict.predictions
            t.waiting = set(verdict.classes)
            for cls in verdict.classes:
                job = {"device_class": cls, "devices": self.spec.measure.devices, "trial": t.trial.number,
                       "holder": f"trial {t.trial.number}",
                       "artifact": str(self.run_dir / "artifacts" / t.candidate.artifact_hash)}
                self.pending[measure_on_class.remote(self.broker, self.actors, job)] = Job(
                    JobKind.MEASURE, t.trial.number, cls)
        elif isinstance(verdict, Failed):
            self._fail(t, verdict.reason, study)
        else:
            self._tell(t, verdict, study)

    # ---------------------------------------------------------------- telling Optuna
    def _tell(self, t: Live, v: Final, study: optuna.Study) -> None:
        cand, spec = t.candidate, self.spec
        assert cand is not None
        for c in spec.constraints:  # every trial carries every constraint (samplers compare them)
            t.trial.set_constraint(c.label, v.constraints[c.label])
        t.trial.set_user_attr("values_source", v.source)
        t.trial.set_user_attr("artifact", str(self.run_dir / "artifacts" / cand.artifact_hash))
        t.trial.set_user_attr("accuracy_test", cand.accuracy_test)
        if v.reason:
            t.trial.set_user_attr("reason", v.reason)
        if t.audit:  # a rejection the measurement checks: false when the constraint holds
            t.trial.set_user_attr("audit", "false rejection" if v.constraints[t.audit] <= 0 else "true rejection")
        study.tell(t.trial, list(v.values) if len(v.values) > 1 else v.values[0])
        predictions = t.predictions or v.predictions
        for p, err in prediction_errors(t.predictions, cand, self.rows):
            self.tally.predicted(p.device_class, err)
        if v.source == "measured" and spec.needs_devices:
            self.view.predictor_status(predictor_status(spec, self.rows, self.known))
        self._record(t, v.outcome, reason=v.reason, values_source=v.source, predictions=predictions,
                     objectives=[{"metric": o.metric, "device_class": o.device_class, "value": x}
                                 for o, x in zip(spec.objectives, v.values)],
                     constraints=[{"label": c.label, "metric": c.metric, "device_class": c.device_class,
                                   "max": c.max, "excess": v.constraints[c.label]} for c in spec.constraints])
        self.view.told(t.trial.number, v.outcome, v.values, v.source, v.reason)

    def _fail(self, t: Live, reason: str, study: optuna.Study) -> None:
        t.trial.set_user_attr("fail_reason", reason[:2000])
        study.tell(t.trial, state=TrialState.FAIL)
        self._record(t, "failed", reason=reason)
        self.view.event(f"trial {t.trial.number} failed: {reason[:300]}")

    def _record(self, t: Live, outcome: str, *, reason: str | None,
                predictions: tuple[Prediction, ...] = (), **verdict: Any) -> None:
        self.live.pop(t.trial.number, None)
        write_candidates(self.run_dir / "candidates", [candidate_row(
            study=self.spec.name, kind="candidate", outcome=outcome, candidate=t.candidate,
            trial=t.trial.number, trial_params=t.params, fail_reason=reason,
            predictions=[p.__dict__ for p in predictions] or None, **verdict)])

    # ---------------------------------------------------------------- display
    def _state(self, study: optuna.Study) -> dict[str, Any]:
        now = time.monotonic()
        stages = [(JobKind.BASE.value, "")] if not self.base else []
        for number, t in sorted(self.live.items()):
            doing = "measuring on " + ", ".join(sorted(t.waiting)) if t.waiting else "training"
            stages.append((f"trial {number}: {doing} ({now - t.started:.0f} s)", settings_line(t.params)))
        kinds = [j.kind for j in self.pending.values()]
        return {"stages": stages, "study": study, "training": kinds.count(JobKind.TRAIN),
                "measuring": kinds.count(JobKind.MEASURE),
                "devices": ray.get(self.broker.status.remote()) if self.devices and self.view.live else {}}

