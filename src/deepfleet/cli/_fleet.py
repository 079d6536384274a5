"""``deepfleet fleet ...``: the device fleet: ``fleet check`` and ``fleet sandbox up|down``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from deepfleet.orchestrator.fleet import Device


@click.group()
def fleet() -> None:
    """Devices that measure candidate models."""


def select_devices(fleet_file: Path | None, names: str | None) -> list[Device]:
    """The devices of ``fleet_file`` (the built-in ``local`` device without one), or those of
    them named in the comma-separated ``names``. Raises ConfigError for a malformed fleet file
    or an unknown name (the message lists the known ones)."""
    from deepfleet.errors import ConfigError
    from deepfleet.orchestrator.fleet import load_fleet, local_fleet

    fleet = load_fleet(fleet_file) if fleet_file is not None else local_fleet()
    if names is None:
        return list(fleet)
    wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    if not wanted:
        raise ConfigError(f"--devices: got {names!r}, an empty list; known devices: "
                          f"{', '.join(fleet.names)}")
    return [fleet[n] for n in wanted]


# Shared by `fleet check` and `measure`.
fleet_option = click.option(
    "--fleet", "fleet_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Fleet file (fleet.yaml). Default: the built-in 'local' device (this machine, no SSH).")


@fleet.command("check")
@fleet_option
@click.option("--devices", default=None, metavar="NAME,NAME,...",
              help="Only these devices of the fleet file.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device instead of "
                                                       "the table.")
def fleet_check(fleet_file: Path | None, devices: str | None, as_json: bool) -> None:
    """Contact every device in parallel: deploy and start the agent, and show what it finds.

    One row per device: reachable, architecture, Python, numpy, where energy readings come
    from, and what is simulated. Each unreachable device gets an error line on stderr naming
    it and the cause; the exit status is then 1 (2 for a bad fleet file or device name).
    """
    from deepfleet.orchestrator.check import check_devices

    checks = check_devices(select_devices(fleet_file, devices))
    if as_json:
        for c in checks:
            click.echo(json.dumps(c.to_dict(), sort_keys=True))
    else:
        from deepfleet.cli._tables import check_table

        click.echo(check_table(checks))
    failed = [c for c in checks if not c.reachable]
    for c in failed:
        click.echo(f"deepfleet: error: {c.error}", err=True)
    if failed:
        click.echo(f"deepfleet: {len(failed)} of {len(checks)} device(s) unreachable: "
                   f"{', '.join(c.device for c in failed)}", err=True)
        sys.exit(1)


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
    from deepfleet.sandbox import up

    kinds = [k for k in devices.split(",") if k.strip()] if devices is not None else None
    path = up(kinds, state_dir=state_dir, loopback=loopback, echo=click.echo)
    click.echo(str(path))


@sandbox.command("down")
@_dir_option
def sandbox_down(state_dir: Path | None) -> None:
    """Stop every sandbox device and remove what ``up`` created."""
    from deepfleet.sandbox import down

    down(state_dir, echo=click.echo)
