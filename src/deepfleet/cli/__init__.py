"""The ``deepfleet`` command line: one click group, one module per command family."""

from __future__ import annotations

import sys

import click

from deepfleet import __version__
from deepfleet.errors import DeepfleetError


class _Group(click.Group):
    """Turns a DeepfleetError into one clear line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except DeepfleetError as exc:
            click.echo(f"deepfleet: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="deepfleet")
def main() -> None:
    """Compress neural networks for small sensing devices and measure them on real hardware."""


def _register() -> None:
    # Imported here, not at the top: each command module pulls in its own dependencies lazily.
    from deepfleet.cli._compress import compress
    from deepfleet.cli._fleet import fleet
    from deepfleet.cli._measure import measure
    from deepfleet.cli._report import report
    from deepfleet.cli._search import demo, search

    for command in (compress, search, demo, fleet, measure, report):
        main.add_command(command)


_register()
