"""``deepfleet search study.yaml`` and ``deepfleet demo``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _interruptible(run: Any, resume_hint: str) -> dict[str, Any]:
    """Run; on Ctrl-C say what is kept and how to continue, instead of a traceback."""
    try:
        return run()  # type: ignore[no-any-return]
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: finished trials and every measured row are kept; continue with: "
                   f"{resume_hint}", err=True)
        raise SystemExit(130) from None


def _print_front(summary: dict[str, Any]) -> None:
    from deepfleet.cli._tables import front_table

    click.echo(front_table(summary))
    click.echo(f"\nresults (Parquet): {summary['results']}\nstudy storage:     {summary['storage']}"
               f"\nsummary:           {Path(summary['run_dir']) / 'summary.json'}"
               f"\nreport:            deepfleet report {summary['run_dir']}")


@click.command()
@click.argument("study_file", type=click.Path(dir_okay=False))
@click.option("--trials", type=int, default=None, help="Trials to run (overrides the study file).")
@click.option("--address", default=None, help="Ray cluster address (HOST:PORT); default: a local Ray.")
@click.option("--storage", default=None, help="Optuna storage URL; default: sqlite in the run directory.")
@click.option("--resume", is_flag=True, help="Continue the study: keep finished trials, rerun interrupted ones.")
@click.option("--fleet", "fleet", default=None, help="Fleet file (overrides the study file); default: the local device.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run directory; default runs/<study name>.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def search(study_file: str, trials: int | None, address: str | None, storage: str | None, resume: bool,
           fleet: str | None, out: str | None, as_json: bool) -> None:
    """Search compression settings with Optuna on Ray, measuring candidates on devices."""
    from deepfleet.orchestrator.search_driver import Search
    from deepfleet.search import load_study

    spec = load_study(study_file)
    if trials is not None and trials < 1:
        from deepfleet.errors import ConfigError

        raise ConfigError(f"--trials must be >= 1, but got {trials}")
    run_dir = Path(out) if out else Path("runs") / spec.name
    search_ = Search(spec, run_dir=run_dir, address=address, storage=storage, resume=resume, trials=trials,
                     fleet=fleet, progress=not as_json)
    summary = _interruptible(search_.run, f"deepfleet search {study_file} --resume"
                             + (f" --out {out}" if out else ""))
    if as_json:
        click.echo(json.dumps(summary, default=str, sort_keys=True))
    else:
        _print_front(summary)


def _sandbox_fleet() -> Path | None:
    """The fleet file of the sandbox fleet when one is up (``deepfleet fleet sandbox up``)."""
    from deepfleet.sandbox import default_state_dir, read_state

    state = read_state(default_state_dir())
    if state is None or not state.fleet_file.is_file():
        return None
    return state.fleet_file


def demo_study(*, trials: int, fleet: str | None) -> tuple[Any, str | None, str]:
    """(the demo study for this machine, fleet file or None for the local device, a line
    saying what runs where). The study is ``search/demo.yaml`` with its classes set to the
    fleet's timed classes (emulated ARM boards are for functional truth, not timings)."""
    import yaml

    from deepfleet.orchestrator.fleet import load_fleet
    from deepfleet.search import DEMO_STUDY, parse_study

    fleet_path = Path(fleet) if fleet else _sandbox_fleet()
    raw = yaml.safe_load(DEMO_STUDY.read_text())
    if fleet_path is not None:
        devices = load_fleet(fleet_path).devices
        timed = [d.device_class for d in devices if "qemu" not in (d.simulated or "")]
        classes = sorted(set(timed or [d.device_class for d in devices]))
        where = f"measured on fleet {fleet_path} (classes {', '.join(classes)})"
    else:
        classes = ["local"]
        where = "measured on this machine (the local device)"
    raw.update(classes=classes, trials=trials,
               objectives=["accuracy", {"metric": "latency_p50", "class": classes[0]}])
    note = f"{trials} trials on {raw['model']} / {raw['data']}, {where}"
    return parse_study(raw, str(DEMO_STUDY)), str(fleet_path) if fleet_path else None, note


@click.command()
@click.option("--trials", type=int, default=10, show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--fleet", "fleet", default=None, help="Fleet file; default: the sandbox fleet if it is up, else the local device.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo.")
def demo(trials: int, out: str, fleet: str | None, resume: bool) -> None:
    """The embedded default: a small search on lenet5 / digits (local Ray, SQLite, local device)."""
    from deepfleet.orchestrator.search_driver import Search

    spec, fleet_path, note = demo_study(trials=trials, fleet=fleet)
    click.echo(f"deepfleet demo: {note}", err=True)
    summary = _interruptible(Search(spec, run_dir=Path(out), resume=resume, fleet=fleet_path).run,
                             f"deepfleet demo --resume --out {out}")
    _print_front(summary)
