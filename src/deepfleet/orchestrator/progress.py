"""The live view of a search: what is training (with which settings) or measuring, for how
long, how many trials are done and about how long the rest will take, each device, and the best
trials so far with metric names and units.

On a terminal it is a ``rich`` live table redrawn in place; elsewhere (CI logs, pipes) it prints
one line per event (a trial started, a trial told), so logs stay readable. Tables use the one
house style of :mod:`deepfleet.cli._tables`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from deepfleet.search import StudySpec, counts, pareto


def fmt(value: float, unit: str = "") -> str:
    """A number for people: four significant digits, and its unit."""
    return f"{value:.4g}{' ' + unit if unit else ''}"


def settings_line(params: dict[str, Any]) -> str:
    """A trial's settings on one line, floats to three significant digits."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class SearchProgress:
    def __init__(self, spec: StudySpec, budget: int, *, enabled: bool = True):
        self.spec, self.budget, self.enabled = spec, budget, enabled
        self.started = time.monotonic()
        self.told_here = 0
        self.predictor: dict[str, dict[str, str]] = {}
        self.console = Console(stderr=True)
        self.live: Live | None = None
        if enabled and sys.stderr.isatty():
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def values(self, values: Sequence[float]) -> str:
        """``accuracy 0.9812, latency_p50@local 0.1532 ms``: labelled, rounded, with units."""
        return ", ".join(f"{o.label} {fmt(v, o.unit)}" for o, v in zip(self.spec.objectives, values))

    def _title(self, done: dict[str, int], training: int, measuring: int) -> str:
        finished = done["complete"] + done["failed"]
        elapsed = time.monotonic() - self.started
        eta = ""
        if self.told_here and finished < self.budget:
            eta = f", about {duration(elapsed / self.told_here * (self.budget - finished))} left"
        rerun = f", {done['interrupted']} interrupted and re-run" if done["interrupted"] else ""
        return (f"deepfleet search {self.spec.name}: {finished}/{self.budget} trials done ({done['failed']} failed"
                f"{rerun}), {training} training, {measuring} measuring; {duration(elapsed)} elapsed{eta}")

    def _table(self, state: dict[str, Any]) -> Table:
        study = state["study"]
        t = Table(title=self._title(counts(study), state["training"], state["measuring"]), title_justify="left")
        t.add_column("what")
        t.add_column("settings")
        for what, settings in state["stages"]:
            t.add_row(what, settings)
        for name, d in sorted(state["devices"].items()):
            status = "quarantined" if d["quarantined"] else (f"measuring ({d['holder']})" if d["holder"] else "idle")
            t.add_row(f"device {name} ({d['class']})", f"{status}, {d['leases']} leases, busy {100 * d['utilisation']:.0f} %")
        best = pareto(study)[:3]
        lines = [f"predictor on {cls}, {metric}: {line}" for cls, m in self.predictor.items() for metric, line in m.items()]
        if best:
            lines.append("best so far: " + "; ".join(f"#{b.number} {self.values(b.values)}" for b in best))
        t.caption = "\n".join(lines) or None
        return t

    def predictor_status(self, status: dict[str, dict[str, str]]) -> None:
        """How the predictor stands per class and metric; printed as events when it changes."""
        for cls, m in status.items():
            for metric, line in m.items():
                if self.predictor.get(cls, {}).get(metric) != line and self.live is None:
                    self.event(f"predictor on {cls}, {metric}: {line}")
        self.predictor = status

    def update(self, state: dict[str, Any]) -> None:
        if self.live is not None:  # the state costs storage reads: only when it is shown
            self.live.update(self._table(state))

    def told(self, number: int, outcome: str, values: Sequence[float], source: str, reason: str | None) -> None:
        """A trial told to Optuna; values not measured are labelled with where they came from."""
        self.told_here += 1
        label = "" if source == "measured" else f" [{source}, not measured]"
        self.event(f"trial {number} {outcome}: {self.values(values)}{label}" + (f" ({reason})" if reason else ""))

    def event(self, line: str) -> None:
        """A one-line message (a trial started or ended, a device failed)."""
        if not self.enabled:
            return
        if self.live is not None:
            self.live.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
