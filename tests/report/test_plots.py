"""The report's figures as drawn: legends never hide data, time axes fit the data they show.

Figures are caught where they become PNG bytes (``_plots._png``), then measured in display
coordinates after a real Agg draw: what a reader sees, without comparing pixels."""

from __future__ import annotations

import datetime as dt
from typing import Any

import matplotlib.dates as mdates
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from deepfleet.report import _plots, load_run
from deepfleet.report._build import build
from tests.report.runs import RunInfo


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the report code renders from now on, drawn (layout done) as saved."""
    figures: list[Figure] = []
    real = _plots._png

    def keep(fig: Figure) -> bytes:
        png = real(fig)
        FigureCanvasAgg(fig).draw()
        figures.append(fig)
        return png

    monkeypatch.setattr(_plots, "_png", keep)
    return figures


def _legends_clear_of_axes(fig: Figure) -> None:
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    axes = [ax.get_window_extent(renderer) for ax in fig.axes if ax.get_visible()]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        hidden = [a for a in axes if Bbox.intersection(box, a) is not None]
        assert hidden == [], f"a legend lies over a plot: legend {box}, axes {hidden}"


def test_no_legend_lies_over_any_plot_of_a_report(search_run: RunInfo, drawn: list[Figure]) -> None:
    build(load_run(search_run.root), max_drop_pp=0.5)
    for fig in drawn:
        _legends_clear_of_axes(fig)
    assert len(drawn) >= 8
    assert sum(1 for f in drawn if f.legends) >= 6  # pareto x3, latency x3, layers, objectives, drift


def test_the_original_star_is_visible_where_a_legend_used_to_sit(drawn: list[Figure]) -> None:
    """The original model in the lower right corner (compressed candidates more accurate and
    faster than it): the old legend (loc='lower right') covered its star."""
    pts = pd.DataFrame({"p50_ms": [1.0, 1.2, 1.5], "accuracy_val": [0.99, 0.992, 0.995],
                        "feasible": [True, True, True], "front_latency": [True, True, True],
                        **{f"front_{c}": [False] * 3 for c in _plots.ENERGY_COLUMNS.values()},
                        **{c: [float("nan")] * 3 for c in _plots.ENERGY_COLUMNS.values()},
                        "trial": [1, 2, 3]})
    baseline = {"p50_ms": 9.0, "accuracy_val": 0.98}
    _plots.pareto_png(pts, title="t", baseline=baseline, chosen=pts.iloc[2].to_dict(),
                      accuracy_floor=0.975)
    [fig] = drawn
    _legends_clear_of_axes(fig)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    ax = fig.axes[0]
    star = ax.transData.transform((9.0, 0.98))
    assert ax.get_window_extent(renderer).contains(*star)  # inside its panel, nothing over it


def _span_days(fig: Figure) -> float:
    lo, hi = fig.axes[0].get_xlim()
    return hi - lo  # matplotlib date units are days


def _reference(times: list[dt.datetime], device: str = "pi4-1") -> pd.DataFrame:
    return pd.DataFrame({"device": device, "artifact_hash": "ab" * 32,
                         "started_at": pd.to_datetime(times, utc=True),
                         "p50_ms": [10.0 + i for i in range(len(times))]})


T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(("lines", "max_days"), [
    ([[0]], 1 / 24),  # one check in all: matplotlib alone spans four years around it
    ([[0, 3]], 1 / 24),  # two checks 3 s apart: an axis of minutes, not years
    ([[0], [0, 2]], 1 / 24),  # a device with one check beside one with two
    ([[0, 3600 * 24 * 3]], 4.0),  # three days of checks: about three days
])
def test_drift_time_axis_fits_the_checks(drawn: list[Figure], lines: list[list[int]],
                                         max_days: float) -> None:
    frame = pd.concat([_reference([T0 + dt.timedelta(seconds=s) for s in seconds], f"pi4-{i}")
                       for i, seconds in enumerate(lines)])
    _plots.drift_png(frame)
    [fig] = drawn
    span = _span_days(fig)
    assert 0 < span <= max_days, f"the time axis spans {span:.3g} days"
    first, last = (mdates.num2date(x) for x in fig.axes[0].get_xlim())
    assert first <= frame["started_at"].min() and last >= frame["started_at"].max()


def test_a_report_with_single_drift_checks_shows_no_drift_plot(
        tmp_path: Any, drawn: list[Figure]) -> None:
    """One check per device says nothing over time: a note and the table, no plot whose axis
    matplotlib would stretch to four years."""
    from tests.report.runs import make_run

    info = make_run(tmp_path, trials=4, reference_every=3)  # 3 measurements, then 1 check
    report = build(load_run(info.root), max_drop_pp=0.5)
    [prov] = [s for s in report.sections if s.key == "provenance"]
    assert [f.title for f in prov.figures] == []
    assert any("one drift check only" in n for n in prov.notes), prov.notes
    assert "drift" in [t.name for t in prov.tables]
