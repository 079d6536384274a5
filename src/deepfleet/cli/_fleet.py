"""``deepfleet fleet ...``: the device fleet. For now the sandbox: ``fleet sandbox up|down``."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def fleet() -> None:
    """Devices that measure candidate models."""


@fleet.group()
def sandbox() -> None:
    """A fleet of real sshd devices on this machine (namespaces, foreign roots, faults)."""


# click makes a fresh Option each time a decorator is applied, so one can serve both commands.
_dir_option = click.option(
    "--dir", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="State directory (default: $DEEPFLEET_CACHE/sandbox or ~/.cache/deepfleet/sandbox).",
)


@sandbox.command("up")
@click.option("--devices", default=None, metavar="KIND,KIND,...",
              help="Device kinds to start: x86, x86-slow, edison, arm64, armhf (repeat a kind for "
                   "several). Default: x86,x86-slow,edison,arm64.")
@click.option("--loopback", is_flag=True,
              help="Only sshd servers on 127.0.0.1 ports (what happens without root).")
@_dir_option
def sandbox_up(devices: str | None, loopback: bool, state_dir: Path | None) -> None:
    """Start sandbox devices and write a fleet.yaml for them.

    Prints each device started, each skipped with the reason, and the fleet file's path (last
    line). Kinds this machine cannot run are skipped, not fatal; no device at all is an error.
    """
    from deepfleet.orchestrator.sandbox import up

    kinds = [k for k in devices.split(",") if k.strip()] if devices is not None else None
    path = up(kinds, state_dir=state_dir, loopback=loopback, echo=click.echo)
    click.echo(str(path))


@sandbox.command("down")
@_dir_option
def sandbox_down(state_dir: Path | None) -> None:
    """Stop every sandbox device and remove what ``up`` created."""
    from deepfleet.orchestrator.sandbox import down

    down(state_dir, echo=click.echo)
