"""Writing a report's files all-or-nothing.

Everything is first written into a hidden temporary folder next to the destination; only when
every file is complete are they moved into place with ``os.replace`` (same file system: each
move is atomic). A failure before that leaves the destination as it was, with no half-written
report; the temporary folder is always removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = ["ReportFiles", "output_paths", "write_all"]


@dataclass(frozen=True)
class ReportFiles:
    """Where a report was written."""

    html: Path
    markdown: Path
    tables: Path  # folder of CSV files
    csv: tuple[Path, ...]


def output_paths(html: Path) -> ReportFiles:
    """The summary and tables that go next to ``html``: ``<stem>.md`` and ``<stem>_tables/``."""
    return ReportFiles(html=html, markdown=html.with_suffix(".md"),
                       tables=html.with_name(html.stem + "_tables"), csv=())


def write_all(html_path: Path, html: str, markdown: str, tables: dict[str, pd.DataFrame]
              ) -> ReportFiles:
    """Write the page, the summary and one CSV per table (all rows, full precision), atomically
    per file and only after all are complete. Returns the final paths."""
    dest = output_paths(html_path)
    parent = html_path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{html_path.stem}.partial-", dir=parent))
    try:
        (tmp / "page.html").write_text(html, encoding="utf-8")
        (tmp / "summary.md").write_text(markdown, encoding="utf-8")
        (tmp / "tables").mkdir()
        for name, frame in tables.items():
            frame.to_csv(tmp / "tables" / f"{name}.csv", index=False)
        # All complete: move into place. The old tables folder is moved aside first (a folder
        # cannot replace a non-empty one) and removed with the temporary folder.
        if dest.tables.exists():
            os.replace(dest.tables, tmp / "old-tables")
        os.replace(tmp / "tables", dest.tables)
        os.replace(tmp / "summary.md", dest.markdown)
        os.replace(tmp / "page.html", dest.html)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    csv = tuple(sorted(dest.tables.glob("*.csv")))
    return ReportFiles(html=dest.html, markdown=dest.markdown, tables=dest.tables, csv=csv)
