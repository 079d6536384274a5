"""The report in a real headless browser: it loads offline without console errors, fetches
nothing, and every plot is drawn (decoded, non-blank, with coloured data marks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deepfleet.report import Report, ReportFiles

# For each <img class="plot">: decode state, natural size, and pixel counts read back through a
# canvas (data: URIs do not taint it): pixels that differ from the corner (background) and
# "colourful" pixels (channel spread > 60): axes and text are grey/black, data marks are not.
_PIXELS_JS = """
return Array.from(document.querySelectorAll('img.plot')).map(img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const out = {alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
               changed: 0, colourful: 0};
  if (!c.width || !c.height) return out;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  const r0 = d[0], g0 = d[1], b0 = d[2];
  for (let i = 0; i < d.length; i += 4) {
    const r = d[i], g = d[i + 1], b = d[i + 2];
    if (Math.abs(r - r0) + Math.abs(g - g0) + Math.abs(b - b0) > 30) out.changed++;
    if (Math.max(r, g, b) - Math.min(r, g, b) > 60) out.colourful++;
  }
  return out;
});
"""


def _open(browser: Any, html: Path) -> list[dict[str, Any]]:
    browser.get_log("browser")  # drop what an earlier page logged
    browser.get(html.resolve().as_uri())
    browser.execute_script("return document.readyState")
    return browser.get_log("browser")


def _check_page(browser: Any, files: ReportFiles, report: Report, shots: Path) -> None:
    logs = _open(browser, files.html)
    errors = [e for e in logs if e.get("level") == "SEVERE"]
    assert errors == [], f"console errors: {errors}"
    assert browser.title == f"deepfleet report: {report.study}"
    # offline and self-contained: the page fetched no resource of its own (images are data:)
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".filter(n => !n.startsWith('data:'))")
    assert fetched == []
    plots = browser.execute_script(_PIXELS_JS)
    assert len(plots) == len(report.figures) > 0
    for p in plots:
        assert p["complete"] and p["w"] > 100 and p["h"] > 100, p
        assert p["changed"] > 0.02 * p["w"] * p["h"], f"plot looks blank: {p}"
        assert p["colourful"] > 50, f"plot has no coloured data marks: {p}"
    # screenshots: the first screen, and each figure as the reader sees it
    shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shots / "page.png"))
    from selenium.webdriver.common.by import By

    for i, element in enumerate(browser.find_elements(By.CSS_SELECTOR, "figure")):
        browser.execute_script("arguments[0].scrollIntoView()", element)
        assert element.screenshot(str(shots / f"figure-{i:02d}.png"))
    saved = sorted(shots.glob("*.png"))
    assert len(saved) == 1 + len(report.figures)
    assert all(s.stat().st_size > 1000 for s in saved)


def test_search_report_renders_in_chromium(browser: Any, search_report: tuple[ReportFiles, Report],
                                           tmp_path: Path) -> None:
    files, report = search_report
    _check_page(browser, files, report, tmp_path / "screenshots")
    # Table 1 and the chosen candidate are on the page, energy kinds labelled in their headers
    headers = browser.execute_script(
        "return Array.from(document.querySelectorAll('table[data-table=table1] th'))"
        ".map(th => [th.textContent, th.className])")
    kinds = {cls for text, cls in headers if "energy" in text}
    assert {"kind-measured", "kind-simulated", "kind-estimated"} <= {
        c for cls in kinds for c in cls.split()}


def test_measure_only_report_renders_in_chromium(
        browser: Any, measure_report: tuple[ReportFiles, Report], tmp_path: Path) -> None:
    files, report = measure_report
    _check_page(browser, files, report, tmp_path / "screenshots")
    text = browser.execute_script("return document.getElementById('absent').innerText")
    assert "no candidate rows" in text
    assert browser.execute_script(
        "return document.querySelectorAll('table[data-table=table1]').length") == 0


@pytest.mark.parametrize("width", [420])
def test_report_stays_readable_on_a_narrow_window(browser: Any, search_report: tuple[ReportFiles, Report],
                                                  width: int) -> None:
    """Wide tables scroll inside their box instead of widening the page."""
    files, _ = search_report
    browser.set_window_size(width, 900)
    try:
        _open(browser, files.html)
        page_width = browser.execute_script("return document.documentElement.scrollWidth")
        viewport = browser.execute_script("return document.documentElement.clientWidth")
        assert page_width <= viewport + 1
    finally:
        browser.set_window_size(1280, 1600)


# (table, its width, the width of the box it sits in) for every table wider than its box
_TOO_WIDE_JS = """
return Array.from(document.querySelectorAll('table[data-table]')).map(t =>
  [t.dataset.table, Math.ceil(t.getBoundingClientRect().width), t.parentElement.clientWidth])
  .filter(([name, w, box]) => w > box + 1);
"""


@pytest.mark.parametrize("run", ["search_report", "measure_report"])
def test_every_table_fits_a_1400_px_window(browser: Any, run: str,
                                           request: pytest.FixtureRequest) -> None:
    """No table needs a horizontal scroll bar at 1400 px: Table 1 (one column per number:
    3200 px before) is shown transposed, column names break after underscores, text cells
    wrap, hashes break anywhere."""
    files, _ = request.getfixturevalue(run)
    browser.set_window_size(1400, 1000)
    try:
        _open(browser, files.html)
        assert browser.execute_script(_TOO_WIDE_JS) == []
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 1400
    finally:
        browser.set_window_size(1280, 1600)


def test_the_pixel_check_sees_a_blank_plot(browser: Any, search_report: tuple[ReportFiles, Report],
                                           tmp_path: Path) -> None:
    """The check above can fail: a page whose only figure is an empty canvas reads as blank."""
    import dataclasses
    import io

    from matplotlib.figure import Figure as MplFigure

    from deepfleet.report._build import Figure, Section
    from deepfleet.report._html import render_html

    buf = io.BytesIO()
    MplFigure(figsize=(4, 3)).savefig(buf, format="png")  # nothing drawn: all background
    _, report = search_report
    blank = dataclasses.replace(report, sections=[Section("blank", "blank", figures=[
        Figure("blank", buf.getvalue())])])
    page = tmp_path / "blank.html"
    page.write_text(render_html(blank, tables_dir="none"))
    assert _open(browser, page) == []
    [plot] = browser.execute_script(_PIXELS_JS)
    assert plot["w"] > 100 and plot["changed"] == 0 and plot["colourful"] == 0
