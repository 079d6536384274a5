"""Fleet benchmarking reports: one self-contained HTML page, a Markdown summary and CSV tables
from a run directory (``results/``, optionally ``candidates/`` and ``artifacts/``).

- :func:`build_report`: load, validate, compute, render and write; returns the file paths.
- :data:`CHOSEN_RULE`: the definition of the "chosen" (compressed) candidate.

Modules: ``_load`` (find and validate), ``_stats`` (pure statistics), ``_analysis`` (class
metrics, Pareto points, the chosen rule), ``_tables`` (pure tables), ``_plots`` (PNG figures),
``_build`` (sections), ``_html``/``_markdown`` (rendering), ``_write`` (all-or-nothing files).
This package may import pandas, pyarrow, matplotlib and jinja2; never torch, ray or optuna.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepfleet.errors import ConfigError
from deepfleet.report._analysis import CHOSEN_RULE, DEFAULT_MAX_DROP_PP
from deepfleet.report._build import Report, build
from deepfleet.report._html import render_html
from deepfleet.report._load import RunData, load_run
from deepfleet.report._markdown import render_markdown
from deepfleet.report._write import ReportFiles, output_paths, write_all

__all__ = ["CHOSEN_RULE", "DEFAULT_MAX_DROP_PP", "Report", "ReportFiles", "RunData",
           "build_report", "load_run"]


def _check_out(out: Path, run: RunData) -> None:
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {out} must name an .html file (the summary and CSV tables go "
                          "next to it), e.g. --out report.html")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name, e.g. {out / 'report.html'}")
    for folder in out.absolute().parents:  # the nearest one that exists must be a folder
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(
                    f"--out {out} lies under {folder}, which is a file, not a folder; give an "
                    f"--out whose folders are folders or do not exist yet, e.g. "
                    f"--out {folder.parent / out.name}")
            break
    results = run.located.results.resolve()
    if out.resolve().is_relative_to(results):
        # pyarrow would try to read the report's files as part of the results dataset
        raise ConfigError(f"--out {out} is inside the results dataset {results}; write the "
                          "report elsewhere, e.g. next to it")


def build_report(path: str | os.PathLike[str], *, study: str | None = None,
                 out: str | os.PathLike[str] | None = None,
                 max_drop_pp: float | None = None) -> tuple[ReportFiles, Report]:
    """Write the report of the run at ``path`` (a run directory or its ``results/``).

    ``out`` is the HTML file (default ``<run>/report.html``); ``<stem>.md`` and ``<stem>_tables/``
    go next to it. ``max_drop_pp`` (None: the study's ``accuracy_drop_pp`` constraint, else
    DEFAULT_MAX_DROP_PP) limits the chosen candidate's validation-accuracy drop; the report says
    which value it used and where it came from. Nothing is written unless everything succeeds.
    Raises ResultsError for data that cannot be reported (missing, empty, unknown study, old
    schema) and ConfigError for a bad ``out`` or ``max_drop_pp``.
    """
    if max_drop_pp is not None and not max_drop_pp >= 0:
        raise ConfigError(f"--max-drop must be >= 0 percentage points, but got {max_drop_pp}; "
                          "give e.g. --max-drop 0.5, or leave it out to use the study's own "
                          "accuracy_drop_pp constraint")
    run = load_run(path, study)
    html_path = Path(out) if out is not None else run.located.run / "report.html"
    _check_out(html_path, run)
    report = build(run, max_drop_pp=max_drop_pp)
    names = output_paths(html_path)
    html = render_html(report, tables_dir=names.tables.name)
    markdown = render_markdown(report, html_name=html_path.name, tables_dir=names.tables.name)
    files = write_all(html_path, html, markdown, {t.name: t.frame for t in report.tables if t.csv})
    return files, report
