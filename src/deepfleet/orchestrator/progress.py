"""The live view of a search: trials done / running / waiting, each device, the best so far.

On a terminal it is a ``rich`` live table redrawn in place; elsewhere (CI logs, pipes) it prints
one line per finished trial, so logs stay readable.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


class SearchProgress:
    def __init__(self, study: str, budget: int, *, enabled: bool = True):
        self.study, self.budget, self.enabled = study, budget, enabled
        self.console = Console(stderr=True)
        self.live: Live | None = None
        if enabled and sys.stderr.isatty():
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def _table(self, state: dict[str, Any]) -> Table:
        t = Table(title=f"deepfleet search {self.study}: {state['done']}/{self.budget} trials "
                        f"({state['running']} training, {state['measuring']} measuring, "
                        f"{state['failed']} failed)")
        t.add_column("device")
        t.add_column("class")
        t.add_column("state")
        t.add_column("leases", justify="right")
        t.add_column("busy", justify="right")
        t.add_column("waiting", justify="right")
        for name, d in sorted(state["devices"].items()):
            status = "quarantined" if d["quarantined"] else (f"measuring ({d['holder']})" if d["holder"] else "idle")
            t.add_row(name, d["class"], status, str(d["leases"]), f"{100 * d['utilisation']:.0f} %", str(d["waiting"]))
        if state.get("best"):
            t.caption = f"best so far: {state['best']}"
        return t

    def update(self, state: dict[str, Any]) -> None:
        if self.live is not None:
            self.live.update(self._table(state))

    def event(self, line: str) -> None:
        """A one-line message (a trial finished, a device failed)."""
        if not self.enabled:
            return
        if self.live is not None:
            self.live.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
