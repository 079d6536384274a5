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
from deepfleet.device_agent.protocol import BACKEND_CHOICES

if TYPE_CHECKING:
    from deepfleet.orchestrator.measure import Outcome

DEFAULT_OUT = Path("runs/measure/results")


def _request(runs: int | None, batch: int, threads: int | None, backend: str) -> dict[str, Any]:
    req: dict[str, Any] = {"batch": batch, "backend": backend}
    if runs is not None:
        # Exactly `runs` timed runs: no time minimum, no confidence-interval rule.
        req.update(min_runs=runs, max_runs=runs, min_seconds=0, ci_target=None)
    if threads is not None:
        req["threads"] = threads
    return req


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _energy(o: Outcome) -> str:
    """Every energy figure the row has, each with its kind: never one number for two kinds."""
    parts = []
    if o.energy_mj is not None:
        parts.append(f"{o.energy_mj:.4g} mJ ({o.energy_kind}, {o.energy_source})")
    if o.estimated_energy_mj is not None:
        parts.append(f"~{o.estimated_energy_mj:.3g} mJ (estimated from operation counts)")
    stated = o.row.get("stated_power_w")
    if o.time_estimated_energy_mj is not None and stated is not None:
        parts.append(f"~{o.time_estimated_energy_mj:.3g} mJ (estimated: busy time x {stated:g} W stated)")
    else:
        parts.append("no time-based estimate (no power: in the fleet file)")
    sensing = o.row.get("sensing_energy_mj")
    if sensing is not None:  # the sensors the model reads, over one sample's window: apart
        parts.append(f"sensing ~{sensing:.3g} mJ (estimated from the fleet's sensor power)")
    return "; ".join(parts)


def _line(o: Outcome) -> str:
    what = "reference" if o.reference else Path(o.artifact).name[:12]
    if not o.ok and o.p50_ms is None:
        return f"{o.device}  {what}  FAILED: {o.error}"
    drift = "-" if o.drift is None else f"{o.drift:+.1%}"
    load = "" if o.init_ms is None else f"  init {_ms(o.init_ms)} ms"
    memory = "" if o.memory_peak_mb is None else f"  memory {_ms(o.memory_peak_mb)} MiB"
    text = (f"{o.device}  {what}  {o.backend}  p50 {_ms(o.p50_ms)} ms (CPU {_ms(o.cpu_p50_ms)})  "
            f"p90 {_ms(o.p90_ms)} ms  p99 {_ms(o.p99_ms)} ms{load}{memory}  energy {_energy(o)}  "
            f"drift {drift}" + (f"  [{o.backend_note}]" if o.backend_note else ""))
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
              help="Intra-op threads of the runtime on the device (default: as found).")
@click.option("--backend", type=click.Choice(list(BACKEND_CHOICES)), default="auto",
              show_default=True,
              help="The runtime: auto = the first of the device's `backends:` (fleet file; default "
                   "onnxruntime, numpy) that is installed there and that the artifact has a file "
                   "for. An explicit runtime a device lacks is that device's failure row.")
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
            runs: int | None, batch: int, threads: int | None, backend: str, reference_every: int,
            out: Path, study: str, as_json: bool) -> None:
    """Measure every ARTIFACT (a directory from 'deepfleet compress') on every device.

    Devices work in parallel, artifacts in the order given. Each measurement is written to
    --out as soon as it ends, failures as rows with their error. Exit status: 0 when every
    measurement succeeded, 1 when any failed, 2 for bad input (nothing is written then).
    """
    from deepfleet.orchestrator.measure import MeasureSettings, measure_many

    selected = select_devices(fleet_file, devices)
    settings = MeasureSettings(request=_request(runs, batch, threads, backend),
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
