"""The Markdown summary: the overview, what is absent, Table 1, the chosen rule and the
headline tables, formatted like the HTML (the CSV files keep every row and digit)."""

from __future__ import annotations

import pandas as pd

from deepfleet.report._analysis import CHOSEN_RULE
from deepfleet.report._build import Report
from deepfleet.report._format import format_value

__all__ = ["render_markdown"]

# The tables worth reading in a summary (name -> heading); the rest are in the HTML and CSVs.
_SUMMARY_TABLES = {
    "table1_paper": "Table 1: original → compressed (reduction)",
    "rank_agreement": "Do device classes rank candidates alike?",
    "unit_variation_summary": "Unit-to-unit variation (CV of p50 across a class's devices)",
    "latency_by_device": "Latency per device",
    "drift": "Drift checks (reference rows)",
}
_MD_ROWS = 20


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, limit: int = _MD_ROWS) -> str:
    """A pipe table of the first ``limit`` rows (hashes shortened), with a line for the rest."""
    if frame.empty:
        return "(no rows)\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for record in frame.head(limit).itertuples(index=False, name=None):
        lines.append("| " + " | ".join(_cell(format_value(c, v, short_hash=True))
                                       for c, v in zip(cols, record)) + " |")
    if len(frame) > limit:
        lines.append(f"\n… {len(frame) - limit} more row(s) in the CSV file.")
    return "\n".join(lines) + "\n"


def render_markdown(report: Report, *, html_name: str, tables_dir: str) -> str:
    """The summary text for ``report``; names the HTML file and the CSV folder it sits next to."""
    out = [f"# deepfleet report: study `{report.study}`", "",
           f"Generated {report.generated_at} from `{report.source}`. Full report: `{html_name}`; "
           f"all tables as CSV in `{tables_dir}/`.", ""]
    out += [f"- **{k}**: {v}" for k, v in report.facts.items()]
    out += [f"- **accuracy-drop limit**: {report.max_drop_pp:g} pp (validation split), from "
            f"{report.max_drop_source}", ""]
    if report.absent:
        out += ["## Not in this report, and why", ""] + [f"- {a}" for a in report.absent] + [""]
    out += ["## Chosen candidate", "", CHOSEN_RULE.replace("MAX_DROP", f"{report.max_drop_pp:g}"),
            "", "Energy columns name their kind (measured, simulated, estimated from operation "
            "counts, time-estimated from busy time x stated power); kinds are never combined. "
            "Latency rows name the runtime (backend); rows of two runtimes are never pooled.", ""]
    by_name = {t.name: t for t in report.tables}
    for name, heading in _SUMMARY_TABLES.items():
        if name in by_name:
            out += [f"## {heading}", "", markdown_table(by_name[name].page_frame())]
    return "\n".join(out)
