"""``deepfleet measure ARTIFACT...``: measure artifacts on devices, rows into Parquet.

A thin layer over :func:`deepfleet.orchestrator.measure.measure_many`: options to settings,
outcomes to lines (a table line or one JSON object per (device, artifact)), failures to exit
status 1. Input errors (missing artifact, unknown device, malformed fleet file) exit 2 with one
line before anything is contacted or written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from deepfleet.cli._fleet import fleet_option, select_devices

if TYPE_CHECKING:
    from deepfleet.orchestrator.measure import Outcome

DEFAULT_OUT = Path("runs/measure/results")


def _request(runs: int | None, batch: int, threads: int | None) -> dict[str, Any]:
    req: dict[str, Any] = {"batch": batch}
    if runs is not None:
        # Exactly `runs` timed runs: no time minimum, no confidence-interval rule.
        req.update(min_runs=runs, max_runs=runs, min_seconds=0, ci_target=None)
    if threads is not None:
        req["threads"] = threads
    return req


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _line(o: Outcome) -> str:
    what = "reference" if o.reference else Path(o.artifact).name[:12]
    if not o.ok and o.p50_ms is None:
        return f"{o.device}  {what}  FAILED: {o.error}"
    if o.energy_mj is not None:
        energy = f"{o.energy_mj:.4g} mJ ({o.energy_kind}, {o.energy_source})"
    elif o.estimated_energy_mj is not None:
        energy = f"~{o.estimated_energy_mj:.3g} mJ (estimated: no sensor reading)"
    else:
        energy = "-"
    sensing = o.row.get("sensing_energy_mj")
    if sensing is not None:
        energy += f" + sensing ~{sensing:.3g} mJ (estimated)"
    drift = "-" if o.drift is None else f"{o.drift:+.1%}"
    text = (f"{o.device}  {what}  p50 {_ms(o.p50_ms)} ms  p90 {_ms(o.p90_ms)} ms  "
            f"p99 {_ms(o.p99_ms)} ms  energy {energy}  drift {drift}")
    return text if o.ok else f"{text}  ERROR: {o.error}"


@click.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@fleet_option
@click.option("--devices", default=None, metavar="NAME,NAME,...",
              help="Only these devices of the fleet (default: all).")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Exactly this many timed runs. Default: the agent's stopping rule (at least "
                   "10 runs and 1 s, until the 95 % CI of the median is within 2 %, at most 30 s).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per run.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="BLAS threads on the device (default: as found).")
@click.option("--reference-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="Re-measure the reference model before each device's first measurement and "
                   "after every this many (0: never); rows record the device's drift.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
              show_default=True, help="Results dataset (Parquet, partitioned by study/device).")
@click.option("--study", default="measure", show_default=True,
              help="Study name: the first partition of the rows.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per (device, artifact) instead of a line of text.")
def measure(artifacts: tuple[Path, ...], fleet_file: Path | None, devices: str | None,
            runs: int | None, batch: int, threads: int | None, reference_every: int, out: Path,
            study: str, as_json: bool) -> None:
    """Measure every ARTIFACT (a directory from 'deepfleet compress') on every device.

    Devices work in parallel, artifacts in the order given. Each measurement is written to
    --out as soon as it ends, failures as rows with their error. Exit status: 0 when every
    measurement succeeded, 1 when any failed, 2 for bad input (nothing is written then).
    """
    from deepfleet.orchestrator.measure import MeasureSettings, measure_many

    selected = select_devices(fleet_file, devices)
    settings = MeasureSettings(request=_request(runs, batch, threads),
                               reference_every=reference_every)

    def show(o: Outcome) -> None:
        if as_json:
            if not o.reference:  # one object per (device, artifact) asked for
                click.echo(json.dumps(o.summary(), sort_keys=True))
        else:
            click.echo(_line(o))

    outcomes = measure_many(selected, list(artifacts), results_root=out, settings=settings,
                            study=study, on_outcome=show)
    failed = [o for o in outcomes if not o.ok and not o.reference]
    wanted = [o for o in outcomes if not o.reference]
    if not as_json:
        click.echo(f"{len(wanted) - len(failed)} of {len(wanted)} measurement(s) succeeded; "
                   f"{sum(o.rows_written for o in outcomes)} row(s) in {out} (study {study!r})")
    if failed:
        sys.exit(1)
