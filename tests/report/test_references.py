"""What the report and the README cite exists in the repository: a reader who follows a
reference ('see DESIGN.md §6') finds the file, or the text says it inline."""

from __future__ import annotations

import re
from pathlib import Path

import deepfleet.report

REPO = Path(__file__).resolve().parents[2]
REPORT = Path(deepfleet.report.__file__).parent
# Markdown files the report itself writes (not references): the summary and its temporary name.
_OUTPUTS = {"report.md", "summary.md"}
_MD = re.compile(r"(?<![<\w./-])([\w./-]+\.md)\b")


def _texts() -> dict[Path, str]:
    files = [REPO / "README.md", *sorted(p for p in REPORT.iterdir() if p.is_file()
                                         and p.suffix in (".py", ".j2"))]
    return {f: f.read_text(encoding="utf-8") for f in files}


def test_every_markdown_file_cited_exists() -> None:
    present = {p.relative_to(REPO).as_posix() for p in REPO.rglob("*.md")
               if not any(part.startswith(".") for part in p.relative_to(REPO).parts)}
    names = {Path(p).name for p in present}
    missing = []
    for path, text in _texts().items():
        for ref in _MD.findall(text):
            if ref in _OUTPUTS:
                continue
            if ref not in present and ("/" in ref or ref not in names):
                missing.append(f"{path.relative_to(REPO)}: {ref}")
    assert missing == [], missing


def test_no_design_section_cited_without_the_file() -> None:
    """'DESIGN §6' in the report's text pointed at a file this repository does not ship."""
    if (REPO / "DESIGN.md").exists():
        return
    cited = [f"{p.relative_to(REPO)}:{text.count('DESIGN')}" for p, text in _texts().items()
             if "DESIGN" in text]
    assert cited == []
