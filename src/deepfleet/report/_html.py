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
    header: bool = False  # a row's label (<th>) in a transposed table


@dataclass(frozen=True)
class _Header:
    name: str
    cls: str

    @property
    def parts(self) -> list[str]:
        """The name cut after each underscore: the page may break a long column name there
        (``latency_p50_<wbr>original_<wbr>ms``) instead of widening the table."""
        pieces = self.name.split("_")
        return [p + "_" for p in pieces[:-1]] + pieces[-1:]


@dataclass(frozen=True)
class _View:
    headers: list[_Header]
    rows: list[list[_Cell]]
    hidden: int  # rows left to the CSV file


def _header_class(frame: pd.DataFrame, col: str) -> str:
    numeric = pd.api.types.is_numeric_dtype(frame[col]) and not pd.api.types.is_bool_dtype(frame[col])
    kind = energy_kind_of(col)
    return " ".join(c for c in ("" if numeric else "text", f"kind-{kind}" if kind else "") if c)


def _cell(table: Table, col: str, value: Any, text_column: bool) -> _Cell:
    # full hashes where provenance is the point; shortened (hover for full) elsewhere
    text = format_value(col, value, short_hash=table.name != "artifacts")
    title = value if isinstance(value, str) and text != value else ""
    cls = "text hash" if col.endswith(("hash", "artifact")) else ("text" if text_column else "")
    return _Cell(text, cls, title)


def _view(table: Table) -> _View:
    frame = table.page_frame()
    classes = {col: _header_class(frame, col) for col in frame.columns}
    shown = frame.head(table.html_rows)
    hidden = max(0, len(frame) - len(shown))
    if table.transpose_by:
        # one column per row of the frame (named by its key values), one row per other column
        keys = list(table.transpose_by)
        headers = [_Header("", "text")] + [
            _Header(" / ".join(format_value(k, r[k]) for k in keys), "")
            for r in shown[keys].to_dict("records")]
        rows = [[_Cell(col, f"text {classes[col]}".strip(), header=True)]
                + [_cell(table, col, v, "text" in classes[col]) for v in shown[col]]
                for col in frame.columns if col not in keys]
        return _View(headers, rows, hidden)
    headers = [_Header(col, classes[col]) for col in frame.columns]
    rows = [[_cell(table, col, value, "text" in classes[col])
             for col, value in zip(frame.columns, record)]
            for record in shown.itertuples(index=False, name=None)]
    return _View(headers, rows, hidden)


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
