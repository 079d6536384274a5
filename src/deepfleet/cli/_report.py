"""``deepfleet report RUN_DIR``: the fleet benchmarking report of a search or measure run."""

from __future__ import annotations

from pathlib import Path

import click


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@click.command()
@click.argument("results_dir", metavar="RESULTS_DIR",
                type=click.Path(path_type=Path, file_okay=False))
@click.option("--study", default=None, help="Study to report on (required when the run holds "
              "several; an unknown name lists those that exist).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="HTML file to write (default: RESULTS_DIR/report.html); the Markdown summary "
                   "<stem>.md and the CSV folder <stem>_tables/ go next to it.")
@click.option("--max-drop", "max_drop", type=float, default=None, show_default=False,
              help="Accuracy-drop limit in percentage points (validation split) for the chosen "
                   "candidate. Default: the study's own accuracy_drop_pp constraint (its max), "
                   "else 0.5. The report says which value it used and where it came from.")
def report(results_dir: Path, study: str | None, out: Path | None, max_drop: float | None) -> None:
    """Write a self-contained HTML report, a Markdown summary and CSV tables for a run.

    RESULTS_DIR is a run directory (holding results/, and candidates/ and artifacts/ after a
    search) or a results dataset itself. Prints the paths written. Nothing is written when the
    data cannot be reported (missing, empty, unknown study, rows of an unknown schema version).
    """
    # lazy: pandas and matplotlib load only when this command runs
    from deepfleet.report import build_report

    files, rep = build_report(results_dir, study=study, out=out, max_drop_pp=max_drop)
    click.echo(f"deepfleet report: study {rep.study!r}: {rep.facts['measurement rows']}")
    click.echo(f"  accuracy-drop limit {rep.max_drop_pp:g} pp, from {rep.max_drop_source}")
    for line in rep.absent:
        click.echo(f"  absent: {line}")
    click.echo(f"html     {files.html} ({_size(files.html)})")
    click.echo(f"summary  {files.markdown}")
    click.echo(f"tables   {files.tables}/ ({len(files.csv)} CSV files)")
