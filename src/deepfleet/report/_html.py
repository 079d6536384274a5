"""The HTML page of a report: one self-contained file (inline CSS, plots as data: URIs, no
script, nothing fetched), rendered from ``report.html.j2`` with autoescaping on."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
import pandas as pd

from deepfleet import __version__
from deepfleet.report._build import Report, Table
from deepfleet.report._format import energy_kind_of, format_value

__all__ = ["render_html"]


@dataclass(frozen=True)
class _Cell:
    text: str
    cls: str
    title: str = ""  # full value on hover (for shortened hashes)


@dataclass(frozen=True)
class _Header:
    name: str
    cls: str


@dataclass(frozen=True)
class _View:
    headers: list[_Header]
    rows: list[list[_Cell]]
    hidden: int  # rows left to the CSV file


def _view(table: Table) -> _View:
    frame = table.frame
    headers = []
    text_cols = set()
    for col in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[col]) and not pd.api.types.is_bool_dtype(frame[col])
        if not numeric:
            text_cols.add(col)
        kind = energy_kind_of(col)
        cls = " ".join(c for c in ("" if numeric else "text", f"kind-{kind}" if kind else "") if c)
        headers.append(_Header(col, cls))
    # full hashes where provenance is the point; shortened (hover for full) elsewhere
    short = table.name != "artifacts"
    rows = []
    shown = frame.head(table.html_rows)
    for record in shown.itertuples(index=False, name=None):
        cells = []
        for col, value in zip(frame.columns, record):
            text = format_value(col, value, short_hash=short)
            title = value if isinstance(value, str) and text != value else ""
            cls = "text hash" if col.endswith(("hash", "artifact")) else ("text" if col in text_cols else "")
            cells.append(_Cell(text, cls, title))
        rows.append(cells)
    return _View(headers, rows, max(0, len(frame) - len(shown)))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(
            lambda name: resources.files("deepfleet.report").joinpath(name).read_text("utf-8")),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=False)
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    return env


def render_html(report: Report, *, tables_dir: str) -> str:
    """The page for ``report``; ``tables_dir`` is the CSV folder's name shown to readers."""
    context: dict[str, Any] = {
        "report": report, "version": __version__, "tables_dir": tables_dir,
        "tables": {t.name: _view(t) for s in report.sections for t in s.tables},
    }
    return _environment().get_template("report.html.j2").render(context)
