"""The embedded default study behind ``deepfleet demo``.

A small search on lenet5 / digits: DeepIoT's target (log-uniform 0.5-10 % of the parameters)
with a short search and fine-tuning, objectives validation accuracy and p50 latency on the
first device class, constraint accuracy drop <= 2 pp. It runs on local Ray with SQLite storage,
on the local device, or on the sandbox fleet when one is up (``deepfleet fleet sandbox up``).
"""

from __future__ import annotations

from pathlib import Path

from deepfleet.orchestrator.fleet import load_fleet
from deepfleet.search._spec import StudySpec, parse_study


def _sandbox_fleet() -> Path | None:
    from deepfleet.orchestrator.sandbox import default_state_dir, read_state

    state = read_state(default_state_dir())
    if state is None or not state.fleet_file.is_file():
        return None
    return state.fleet_file


def demo_spec(*, trials: int = 10, fleet: str | None = None) -> tuple[StudySpec, str | None, str]:
    """(study, fleet file or None for the local device, a line saying what runs where)."""
    fleet_path = Path(fleet) if fleet else _sandbox_fleet()
    if fleet_path is not None:
        devices = load_fleet(fleet_path).devices
        # Emulated ARM boards are for functional truth, not timings: time on the others.
        timed = [d.device_class for d in devices if "qemu" not in (d.simulated or "")]
        classes = sorted(set(timed or [d.device_class for d in devices]))
        note = f"{trials} trials on lenet5 / digits, measured on fleet {fleet_path} (classes {', '.join(classes)})"
    else:
        classes = ["local"]
        note = f"{trials} trials on lenet5 / digits, measured on this machine (the local device)"
    raw = {
        "name": "demo",
        "model": "lenet5",
        "data": "digits",
        "classes": classes,
        "space": {
            "method": ["deepiot", "deepiot+fixedpoint"],
            "deepiot.target": {"low": 0.005, "high": 0.1, "log": True},
            "fixedpoint.bits": [4, 8],
            "deepiot.iterations": 400,
            "deepiot.eval_every": 200,
        },
        "training": {"finetune_epochs": 15},
        "objectives": ["accuracy", {"metric": "latency_p50", "class": classes[0]}],
        "constraints": [{"metric": "accuracy_drop_pp", "max": 2.0}],
        "trials": trials,
        "parallelism": 2,
        "measure": {"min_runs": 20, "min_seconds": 0.2, "max_seconds": 2.0},
    }
    return parse_study(raw, "<demo>"), str(fleet_path) if fleet_path else None, note
