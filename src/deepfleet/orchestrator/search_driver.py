"""The search: Optuna ask/tell in the driver, training on Ray workers, measuring on devices.

One trial: ask -> train (a Ray task, CPUs/GPUs from the study) -> judge what training already
knows (a broken accuracy or size constraint is told at once, no device time) -> predict latency
and energy per class from structure (a clear predicted violation is told at once) -> measure on
each target class through the broker (devices leased exclusively; a device lost mid-measurement
re-queues the measurement on another device of its class) -> tell. Training of later trials
overlaps the measurement of earlier ones. Every row is written as it is measured.

Run directory::

    RUN_DIR/study.db  artifacts/<sha256>/  results/  candidates/  trained/  summary.json
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import TrialState

from deepfleet._files import write_json
from deepfleet.errors import ConfigError, DeepfleetError
from deepfleet.orchestrator.broker import BrokerActor, measure_on_class
from deepfleet.orchestrator.candidates import candidate_row, write_candidates
from deepfleet.orchestrator.device_actor import start_device_actors
from deepfleet.orchestrator.fleet import Fleet, load_fleet, local_fleet
from deepfleet.orchestrator.measure import MeasureSettings
from deepfleet.orchestrator.progress import SearchProgress
from deepfleet.orchestrator.raycluster import driver_node_id, start_ray
from deepfleet.orchestrator.results import read_results
from deepfleet.orchestrator.trainer import train_base, train_candidate, write_artifact_files
from deepfleet.search import _predictor as predictor
from deepfleet.search._objectives import (
    ROW_FIELD,
    broken_before_measurement,
    class_metrics,
    constraint_values,
    metric_value,
    objective_values,
)
from deepfleet.search._spec import StudySpec
from deepfleet.search._study import finished, open_study, pareto, suggest, trial_record


@dataclass
class _Job:
    """What a pending Ray reference is: a training, a measurement or a baseline measurement."""

    kind: str  # train | measure | baseline
    trial: _Trial | None
    device_class: str = ""


@dataclass
class _Trial:
    trial: optuna.Trial
    params: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    candidate: dict[str, Any] | None = None
    artifact: Path | None = None
    waiting_classes: set[str] = field(default_factory=set)
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    predicted: dict[str, float] = field(default_factory=dict)


def resolve_fleet(spec: StudySpec, override: str | None) -> Fleet:
    """The study's fleet (a path relative to the study file), ``--fleet``, or the local device."""
    path = override or spec.fleet
    if not path:
        return local_fleet()
    p = Path(path)
    if not p.is_absolute() and spec.source not in ("<dict>", ""):
        p = Path(spec.source).parent / p
    return load_fleet(p)


def _check_classes(spec: StudySpec, fleet: Fleet) -> None:
    have = sorted({d.device_class for d in fleet.devices})
    for cls in spec.classes:
        if spec.needs_devices and cls not in have:
            raise ConfigError(
                f"{spec.source}: classes: device class {cls!r} has no device in the fleet "
                f"({fleet.path or 'the built-in local device'}); classes there: {', '.join(have)}"
            )


class Search:
    """One run of a study; ``run()`` returns the summary (also saved as summary.json)."""

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
        self.fleet = resolve_fleet(spec, fleet)
        _check_classes(spec, self.fleet)
        self.results_root = self.run_dir / "results"
        self.artifacts_root = self.run_dir / "artifacts"
        self.progress_enabled = progress
        self.rows: list[dict[str, Any]] = []  # every row of this study so far (incl. earlier runs)
        self.prediction_errors: dict[str, list[float]] = {}
        self.events: list[str] = []
        self.baseline_measured: set[str] = set()

    # ---------------------------------------------------------------- setup
    def _devices(self) -> list[Any]:
        if not self.spec.needs_devices:
            return []
        return [d for d in self.fleet.devices if d.device_class in self.spec.classes]

    def _load_existing_rows(self) -> None:
        """Rows an earlier run of this study measured: reused on --resume, and predictor data."""
        if self.results_root.is_dir():
            frame = read_results(self.results_root, study=self.spec.name)
            frame = frame.drop(columns=["latencies_ms", "affinity"]).astype(object)
            self.rows = frame.where(frame.notna(), None).to_dict("records")

    def _train_key(self, params: dict[str, Any]) -> str:
        s = self.spec
        desc = {"model": s.model, "data": s.data, "seed": s.seed, "training": s.training, "params": params}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _reusable_training(self, params: dict[str, Any]) -> dict[str, Any] | None:
        path = self.run_dir / "trained" / f"{self._train_key(params)}.json"
        if not path.is_file():
            return None
        cand = json.loads(path.read_text())
        if not (self.artifacts_root / cand["digest"]).is_dir():
            return None
        return cand

    def _remember_training(self, params: dict[str, Any], cand: dict[str, Any]) -> None:
        folder = self.run_dir / "trained"
        folder.mkdir(parents=True, exist_ok=True)
        facts = {k: v for k, v in cand.items() if k not in ("files", "original_files")}
        write_json(folder / f"{self._train_key(params)}.json", facts)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        spec = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        study, requeued = open_study(spec, self.storage, resume=self.resume)
        resources = start_ray(self.address)
        node = driver_node_id()
        devices = self._devices()
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        broker = BrokerActor.options(scheduling_strategy=strategy).remote(
            [{"name": d.name, "device_class": d.device_class} for d in devices])
        actors = start_device_actors(devices, str(self.results_root), spec.name, node, _measure_settings(spec))
        self._load_existing_rows()
        trainer = ray.remote(train_candidate).options(num_cpus=spec.resources.cpu, num_gpus=spec.resources.gpu,
                                                      max_retries=0)
        view = SearchProgress(spec.name, self.budget, enabled=self.progress_enabled)
        base_job = {"model": spec.model, "data": spec.data, "seed": spec.seed, "threads": max(1, int(spec.resources.cpu))}
        try:
            base = ray.get(ray.remote(train_base).options(num_cpus=spec.resources.cpu, max_retries=0).remote(base_job))
        except Exception as exc:
            view.close()
            raise ConfigError(f"{spec.source}: the base model could not be trained: {_reason(exc)}") from None
        view.event(f"base model {spec.model} on {spec.data}: validation accuracy {base['val_accuracy']:.4f}"
                   + (" (cached)" if base["cached"] else ""))
        for params in requeued:
            view.event(f"resume: re-running interrupted trial with {params}")
        pending: dict[Any, _Job] = {}
        live: dict[int, _Trial] = {}
        t_start = time.monotonic()
        first_measure: float | None = None
        train_seconds: list[float] = []
        try:
            while True:
                done_count = len(finished(study))
                in_flight = len(live)
                training = sum(1 for j in pending.values() if j.kind == "train")
                while done_count + in_flight < self.budget and training < spec.parallelism:
                    t = self._ask(study)
                    live[t.trial.number] = t
                    in_flight += 1
                    cand = self._reusable_training(t.params)
                    if cand is not None:
                        view.event(f"trial {t.trial.number}: training reused from an earlier run")
                        self._trained(t, cand, study, broker, actors, pending, view)
                        if not t.waiting_classes:  # judged or measured already: done now
                            self._finish(t, study, view)
                            live.pop(t.trial.number, None)
                    else:
                        job = {"model": spec.model, "data": spec.data, "seed": spec.seed, "params": t.params,
                               "training": spec.training, "threads": max(1, int(spec.resources.cpu))}
                        pending[trainer.remote(job)] = _Job("train", t)
                        training += 1
                if not live and done_count >= self.budget:
                    break
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    job = pending.pop(ref)
                    if job.kind == "baseline":
                        self.rows += ray.get(ref)["rows"]
                        continue
                    t = job.trial
                    assert t is not None
                    if job.kind == "train":
                        try:
                            cand = ray.get(ref)
                        except Exception as exc:  # a trial's failure must not end the study
                            self._fail(t, study, _reason(exc), view)
                            live.pop(t.trial.number, None)
                            continue
                        train_seconds.append(cand["train_seconds"])
                        self._remember_training(t.params, cand)
                        self._trained(t, cand, study, broker, actors, pending, view)
                        if first_measure is None and any(j.kind != "train" for j in pending.values()):
                            first_measure = time.monotonic()  # utilisation counts from here
                            ray.get(broker.reset_clock.remote())
                    else:
                        out = ray.get(ref)
                        t.rows += out["rows"]
                        self.rows += out["rows"]
                        t.errors += out["errors"]
                        t.waiting_classes.discard(job.device_class)
                    if t.candidate is not None and not t.waiting_classes and t.trial.number in live:
                        self._finish(t, study, view)
                        live.pop(t.trial.number, None)
                if view.live is not None:  # the state costs storage reads and a broker call
                    view.update(self._state(study, live, pending, broker))
        finally:
            view.close()
        device_status = ray.get(broker.status.remote()) if devices else {}
        for a in actors.values():
            a.close.remote()
        return self._summary(study, device_status, time.monotonic() - t_start, train_seconds, resources, first_measure)

    def _ask(self, study: optuna.Study) -> _Trial:
        trial = study.ask()
        return _Trial(trial, suggest(trial, self.spec.space))

    def _trained(self, t: _Trial, cand: dict[str, Any], study: optuna.Study, broker: Any,
                 actors: dict[str, Any], pending: dict[Any, _Job], view: SearchProgress) -> None:
        spec = self.spec
        if "files" in cand:
            t.artifact = write_artifact_files(self.artifacts_root, cand["digest"], cand["files"])
            write_artifact_files(self.artifacts_root, cand["original_digest"], cand["original_files"])
        else:
            t.artifact = self.artifacts_root / cand["digest"]
        t.candidate = {k: v for k, v in cand.items() if k not in ("files", "original_files")}
        self._baseline(cand, broker, actors, pending)
        broken = broken_before_measurement(spec, t.candidate)
        if broken:
            t.candidate["outcome"] = "infeasible"
            t.candidate["reason"] = f"breaks {', '.join(broken)} before measurement"
            return
        needed = sorted({o.device_class for o in spec.objectives if o.device_class}
                        | {c.device_class for c in spec.constraints if c.device_class})
        for cls in needed:
            if self._predict_breaks(t, cls):
                t.candidate["outcome"] = "predicted_infeasible"
                t.waiting_classes.clear()
                return
        for cls in needed:
            reused = [r for r in self.rows if r.get("artifact_hash") == t.artifact.name
                      and r.get("device_class") == cls and not r.get("error") and not r.get("reference")]
            if reused:  # measured before (e.g. by an interrupted run): no device time
                t.rows += reused
                continue
            t.waiting_classes.add(cls)
            job = {"device_class": cls, "devices": spec.measure.devices, "holder": f"trial {t.trial.number}",
                   "artifact": str(t.artifact), "trial": t.trial.number}
            pending[measure_on_class.remote(broker, actors, job)] = _Job("measure", t, cls)

    def _baseline(self, cand: dict[str, Any], broker: Any, actors: dict[str, Any],
                  pending: dict[Any, _Job]) -> None:
        """Record the original model as the baseline candidate and measure it once per class."""
        digest = cand["original_digest"]
        if digest in self.baseline_measured:
            return
        self.baseline_measured.add(digest)
        write_candidates(self.run_dir / "candidates", [candidate_row(
            study=self.spec.name, kind="baseline", outcome="baseline", method="none", model=self.spec.model,
            data=self.spec.data, artifact_hash=digest, accuracy_val=cand["accuracy_base_val"],
            accuracy_test=cand["accuracy_base_test"], accuracy_drop_pp=0.0, params=cand["params_base"],
            macs=cand["macs_base"], bytes=cand["bytes_base"], kept_params=1.0)])
        for cls in sorted({d.device_class for d in self._devices()}):
            if any(r.get("artifact_hash") == digest and r.get("device_class") == cls and not r.get("error")
                   for r in self.rows):
                continue  # measured by an earlier run of this study
            job = {"device_class": cls, "devices": 1, "holder": "baseline", "trial": None,
                   "artifact": str(self.artifacts_root / digest)}
            pending[measure_on_class.remote(broker, actors, job)] = _Job("baseline", None, cls)

    def _predict_breaks(self, t: _Trial, cls: str) -> bool:
        assert t.candidate is not None
        fits: dict[str, predictor.Fit | None] = {}  # one fit per metric, shared below

        def fit_for(metric: str) -> predictor.Fit | None:
            if metric not in fits:
                field_ = ROW_FIELD[metric]
                fits[metric] = predictor.fit(predictor.training_points(self.rows, cls, field_), field_)
            return fits[metric]

        for c in self.spec.constraints:
            if c.device_class != cls or c.metric not in ROW_FIELD:
                continue
            fit = fit_for(c.metric)
            if fit is None:
                continue
            breaks, pred = predictor.clearly_breaks(fit, t.candidate, c.max)
            t.predicted[f"{c.metric}@{cls}"] = pred
            if breaks:
                t.candidate["reason"] = (f"predicted {c.metric}@{cls} = {pred:.3g} breaks <= {c.max:g} by more than "
                                         f"{100 * predictor.margin(fit):.0f} % (predictor error {100 * fit.loo_error:.1f} %)")
                return True
        for o in self.spec.objectives:  # predictions of objectives, to measure the predictor's error
            if o.device_class == cls and o.metric in ROW_FIELD:
                fit = fit_for(o.metric)
                if fit is not None:
                    t.predicted[f"{o.metric}@{cls}"] = fit.predict(t.candidate)
        return False

    # ---------------------------------------------------------------- telling Optuna
    def _finish(self, t: _Trial, study: optuna.Study, view: SearchProgress) -> None:
        spec, cand = self.spec, t.candidate
        assert cand is not None
        outcome = cand.get("outcome", "measured")
        if outcome == "measured" and t.errors:
            self._fail(t, study, "; ".join(t.errors), view)
            return
        per_class = class_metrics(t.rows)
        known = constraint_values(spec, cand, per_class)
        if outcome == "measured":
            for label, value in t.predicted.items():
                metric, _, cls = label.partition("@")
                actual = per_class.get((metric, cls))
                if actual:
                    self.prediction_errors.setdefault(cls, []).append(abs(value - actual) / actual)
            values = objective_values(spec, cand, per_class)
            source = "measured"
        else:
            values, source = self._unmeasured_values(cand, per_class, t.predicted)
        for c in spec.constraints:  # every trial carries every constraint (NSGA-II compares them)
            t.trial.set_constraint(c.label, known.get(c.label, _predicted_violation(c, t.predicted)))
        t.trial.set_user_attr("values_source", source)
        t.trial.set_user_attr("artifact", str(t.artifact))
        t.trial.set_user_attr("accuracy_test", cand["accuracy_test"])
        if cand.get("reason"):
            t.trial.set_user_attr("reason", cand["reason"])
        study.tell(t.trial, values if len(values) > 1 else values[0])
        labels = [o.label for o in spec.objectives]
        self._candidate(t, outcome, dict(zip(labels, values)), dict(known), source)
        view.event(f"trial {t.trial.number} {outcome}: " + ", ".join(f"{k}={v:.4g}" for k, v in zip(labels, values))
                   + (f" ({cand['reason']})" if cand.get("reason") else ""))

    def _unmeasured_values(self, cand: dict[str, Any], per_class: dict[tuple[str, str], float],
                           predicted: dict[str, float]) -> tuple[list[float], str]:
        """Objective values for a trial judged without measurement: predicted, else a placeholder
        (the worst value seen, doubled). Infeasible trials never reach the Pareto front."""
        values, source = [], "predicted"
        for o in self.spec.objectives:
            v = metric_value(o.metric, o.device_class, cand, per_class)
            if v is not None:  # known from training (accuracy, bytes, ...) or measured
                values.append(v)
                continue
            key = f"{o.metric}@{o.device_class}"
            if key in predicted:
                values.append(predicted[key])
                continue
            field_ = ROW_FIELD.get(o.metric, "")
            seen = [float(r[field_]) for r in self.rows if r.get(field_) is not None and r.get("device_class") == o.device_class]
            values.append(2 * max(seen) if seen else 1e6)
            source = "placeholder"
        return values, source

    def _fail(self, t: _Trial, study: optuna.Study, reason: str, view: SearchProgress) -> None:
        study._storage.set_trial_user_attr(t.trial._trial_id, "fail_reason", reason[:2000])
        study.tell(t.trial, state=TrialState.FAIL)
        self._candidate(t, "failed", None, None, None, reason=reason)
        view.event(f"trial {t.trial.number} failed: {reason[:300]}")

    def _candidate(self, t: _Trial, outcome: str, objectives: dict[str, float] | None,
                   constraints: dict[str, float] | None, source: str | None, reason: str | None = None) -> None:
        c = t.candidate or {}
        write_candidates(self.run_dir / "candidates", [candidate_row(
            study=self.spec.name, kind="candidate", outcome=outcome, trial=t.trial.number,
            method=str(t.params.get("method", "")), params_json=t.params, model=self.spec.model,
            data=self.spec.data, artifact_hash=t.artifact.name if t.artifact else None,
            accuracy_val=c.get("accuracy"), accuracy_test=c.get("accuracy_test"),
            accuracy_drop_pp=c.get("accuracy_drop_pp"), params=c.get("params"), macs=c.get("macs"),
            bytes=c.get("bytes"), kept_params=c.get("kept_params"), layers_json=c.get("layers"),
            objectives_json=objectives, constraints_json=constraints, values_source=source,
            predicted_json=t.predicted or None, fail_reason=reason or c.get("reason"),
            node=c.get("node"), train_seconds=c.get("train_seconds"))])

    # ---------------------------------------------------------------- reporting
    def _state(self, study: optuna.Study, live: dict[int, _Trial], pending: dict[Any, _Job],
               broker: Any) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False)
        best = pareto(study)
        return {
            "done": len(finished(study)),
            "running": sum(1 for j in pending.values() if j.kind == "train"),
            "measuring": sum(1 for j in pending.values() if j.kind != "train"),
            "failed": sum(1 for t in trials if t.state == TrialState.FAIL),
            "devices": ray.get(broker.status.remote()) if self._devices() else {},
            "best": ", ".join(f"#{t.number} {t.values}" for t in best[:3]) if best else "",
        }

    def _summary(self, study: optuna.Study, devices: dict[str, Any], wall: float, train_s: list[float],
                 resources: dict[str, Any], first_measure: float | None) -> dict[str, Any]:
        labels = [o.label for o in self.spec.objectives]
        trials = study.get_trials(deepcopy=False)
        summary = {
            "study": self.spec.name,
            "storage": self.storage,
            "run_dir": str(self.run_dir),
            "results": str(self.results_root),
            "objectives": labels,
            "directions": self.spec.directions,
            "trials": {s.name.lower(): sum(1 for t in trials if t.state == s) for s in TrialState},
            "pareto": [trial_record(t, labels) for t in pareto(study)],
            "wall_seconds": round(wall, 2),
            "train_seconds_mean": round(statistics.mean(train_s), 2) if train_s else None,
            "trained_here": len(train_s),
            "ray_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
            "devices": devices,
            "prediction_error_median": {c: statistics.median(v) for c, v in self.prediction_errors.items() if v},
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary


def _reason(exc: BaseException) -> str:
    """A one-line reason from a (Ray-wrapped) exception."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, DeepfleetError):
        return str(cause)
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"


def _predicted_violation(c: Any, predicted: dict[str, float]) -> float:
    key = f"{c.metric}@{c.device_class}"
    return predicted[key] - c.max if key in predicted else 0.0


def _measure_settings(spec: StudySpec) -> MeasureSettings:
    """The agent request for the study's ``measure:`` section, with drift references."""
    m = spec.measure
    request = {"warmup": m.warmup, "min_runs": m.min_runs, "max_runs": m.max_runs, "min_seconds": m.min_seconds,
               "max_seconds": m.max_seconds, "batch": m.batch, "threads": m.threads, "ci_target": 0.03,
               "thermal": {"settle_max_s": 5.0}}
    return MeasureSettings(request=request, reference_every=m.reference_every)
