"""What one session of a search needs around its loop: the fleet it measures on, the agent's
measure request, training remembered across sessions, and the summary (totals over every
session of the study, and each session's own figures)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from deepfleet._files import write_json
from deepfleet.candidate import Candidate
from deepfleet.orchestrator.fleet import Device, Fleet, load_fleet, local_fleet
from deepfleet.orchestrator.measure import MeasureSettings
from deepfleet.search import (
    StudySpec,
    check_sensing,
    counts,
    pareto,
    predictor_status,
    trial_record,
)
from deepfleet.search import check_fleet as check_study_fleet


def resolve_fleet(spec: StudySpec, override: str | None) -> Fleet:
    """The study's fleet (a path relative to the study file), ``--fleet``, or the local device."""
    path = override or spec.fleet
    if not path:
        return local_fleet()
    p = Path(path)
    if not p.is_absolute() and spec.source not in ("<dict>", ""):
        p = Path(spec.source).parent / p
    return load_fleet(p)


def _energy_kind(device: Device) -> str | None:
    """The kind of energy a device gives: None without a sensor, 'simulated' for a model of
    one, else 'measured'. A remote device on ``source: auto`` is assumed to have a sensor (its
    rows say otherwise if not); the local device is asked, which costs one agent start."""
    if device.energy.source == "none":
        return None
    if device.energy.simulated:
        return "simulated"
    if device.is_local and device.energy.source == "auto":
        from deepfleet.orchestrator.check import check_devices

        found = check_devices([device])[0].energy or ""
        return None if found.startswith("none") else "simulated" if "[says simulated]" in found else "measured"
    return "measured"


def check_fleet(spec: StudySpec, fleet: Fleet) -> list[Device]:
    """The devices the study measures on; ConfigError (nothing written yet) when a class has
    none or an energy objective asks for a kind its devices cannot give."""
    devices = [d for d in fleet.devices if d.device_class in spec.device_classes]
    needs_energy = any((x.metric in ("energy", "energy_simulated")) for x in (*spec.objectives, *spec.constraints))
    kinds: dict[str, dict[str, str | None]] = {}
    for d in fleet.devices:
        kinds.setdefault(d.device_class, {})[d.name] = _energy_kind(d) if needs_energy and d in devices else None
    check_study_fleet(spec, kinds)
    power: dict[str, dict[str, set[str]]] = {}
    for d in devices:
        power.setdefault(d.device_class, {})[d.name] = set(d.sensor_mw)
    check_sensing(spec, power)
    return devices


def measure_settings(spec: StudySpec) -> MeasureSettings:
    """The agent request for the study's ``measure:`` section, with drift references."""
    m = spec.measure
    request = {"warmup": m.warmup, "min_runs": m.min_runs, "max_runs": m.max_runs, "min_seconds": m.min_seconds,
               "max_seconds": m.max_seconds, "batch": m.batch, "threads": m.threads, "ci_target": 0.03,
               "thermal": {"settle_max_s": 5.0}, "backend": m.backend}
    return MeasureSettings(request=request, reference_every=m.reference_every)


def _train_key(spec: StudySpec, params: dict[str, Any]) -> str:
    desc = {"model": spec.model, "data": spec.data, "seed": spec.seed, "training": spec.training, "params": params,
            "base": [spec.base_checkpoint, spec.base_epochs]}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def remember_training(run_dir: Path, spec: StudySpec, params: dict[str, Any], candidate: Candidate) -> None:
    """Keep a trained candidate so that a later session with the same parameters reuses it."""
    folder = run_dir / "trained"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{_train_key(spec, params)}.json", candidate.to_dict())


def recalled_training(run_dir: Path, spec: StudySpec, params: dict[str, Any]) -> Candidate | None:
    """The candidate an earlier session trained with these parameters, when its artifact is
    still there; None otherwise."""
    path = run_dir / "trained" / f"{_train_key(spec, params)}.json"
    try:
        cand = Candidate.from_dict(json.loads(path.read_text())) if path.is_file() else None
    except (TypeError, ValueError):  # written by an older version: train again
        return None
    return cand if cand and (run_dir / "artifacts" / cand.artifact_hash).is_dir() else None


def predictor_summary(search: Any, study: optuna.Study) -> dict[str, Any]:
    """How the predictor stands per class (model, points, held-out error, or why it cannot
    predict), and what its rejections cost: candidates rejected on a prediction without device
    time, those measured anyway (``search.audit_rejections``) and how many of those the
    measurement showed feasible (false rejections)."""
    audits = [t.user_attrs["audit"] for t in study.get_trials(deepcopy=False) if "audit" in t.user_attrs]
    rejected = sum(1 for t in study.get_trials(deepcopy=False)
                   if str(t.user_attrs.get("reason", "")).startswith("predicted "))
    false = audits.count("false rejection")
    return {"model": search.spec.judging.predictor, "classes": predictor_status(search.spec, search.rows, search.known),
            "rejected_unmeasured": rejected, "audited": len(audits), "false_rejections": false,
            "false_rejection_share": round(false / len(audits), 4) if audits else None}


@dataclass
class Tally:
    """This session's figures as they happen, and the summary over every session."""

    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    train_seconds: list[float] = field(default_factory=list)
    prediction_errors: dict[str, list[float]] = field(default_factory=dict)

    def trained(self, seconds: float) -> None:
        self.train_seconds.append(seconds)

    def predicted(self, device_class: str, relative_error: float) -> None:
        self.prediction_errors.setdefault(device_class, []).append(relative_error)

    def summary(self, search: Any, study: optuna.Study, session: int, devices: dict[str, Any],
                resources: dict[str, Any]) -> dict[str, Any]:
        """The summary of the study after this session; saved as RUN_DIR/summary.json."""
        path = search.run_dir / "summary.json"
        earlier = json.loads(path.read_text()).get("sessions", []) if path.is_file() else []
        this = {
            "session": session, "started_at": self.started_at,
            "wall_seconds": round(time.monotonic() - self.started, 2), "trained_here": len(self.train_seconds),
            "train_seconds_mean": round(statistics.mean(self.train_seconds), 2) if self.train_seconds else None,
            "ray_resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")}, "devices": devices,
            "prediction_error_median": {c: statistics.median(v) for c, v in self.prediction_errors.items() if v},
        }
        sessions = [s for s in earlier if s.get("session") != session] + [this]
        labels = [o.label for o in search.spec.objectives]
        summary = {
            "study": search.spec.name, "storage": search.storage, "run_dir": str(search.run_dir),
            "results": str(search.run_dir / "results"), "objectives": labels,
            "units": {o.label: o.unit for o in search.spec.objectives}, "directions": search.spec.directions,
            "trials": counts(study), "pareto": [trial_record(t, labels) for t in pareto(study)],
            "wall_seconds": round(sum(s["wall_seconds"] for s in sessions), 2),
            "trained_here": sum(s["trained_here"] for s in sessions),
            "sessions": sessions, **{k: this[k] for k in ("devices", "train_seconds_mean", "ray_resources",
                                                           "prediction_error_median")},
            "predictor": predictor_summary(search, study),
        }
        write_json(path, summary)
        return summary
