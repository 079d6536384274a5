"""The terminal's tables, in one style for every command (compress, search, demo, fleet check).

Each function turns plain data into text: a ``rich`` table rendered without colour to a string,
so it reads the same on a terminal, in a pipe and in a CI log.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
           notes: Sequence[str] = (), right: Sequence[int] = ()) -> str:
    """A table in the house style: a title line, a header, one line per row, then notes.
    ``right``: indices of columns to right-align (numbers)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if i in right else "left", overflow="fold")
    for r in rows:
        table.add_row(*("-" if v is None else str(v) for v in r))
    out = io.StringIO()
    Console(file=out, width=160, no_color=True, highlight=False, emoji=False).print(table)
    lines = [line.rstrip() for line in out.getvalue().rstrip("\n").splitlines()]
    return "\n".join([*([title] if title else []), *lines, *notes])  # a title never wraps to the table


def compress_table(r: dict[str, Any]) -> str:
    """The per-layer table of a ``compress`` summary, in the layout of DeepIoT's tables."""
    methods = ",".join(r.get("methods", ["deepiot"]))
    rows = [(row["name"], row["kind"], f"{row['units_before']} -> {row['units_after']}",
             f"{row['params_before']:,} -> {row['params_after']:,}",
             f"{row.get('nonzero_after', row['params_after']):,}", f"{row.get('bits_per_weight', 32):.3g}")
            for row in r["layers"]]
    rows.append(("total", "", "", f"{r['params_before']:,} -> {r['params_after']:,}", "", ""))
    notes = [
        "(bits: storage bits per weight of the layer's weight matrices)",
        "",
        f"kept parameters  {100 * r['kept_params']:.2f} %   kept MACs {100 * r['kept_macs']:.2f} %"
        f"   (target {100 * r['target']:g} % of {r['metric']})",
        f"test accuracy    {100 * r['accuracy_before']:.2f} % -> {100 * r['accuracy_after']:.2f} %"
        f"   ({100 * (r['accuracy_after'] - r['accuracy_before']):+.2f} pp)",
        f"artifact bytes   {r['bytes_before']:,} -> {r['bytes_after']:,}",
        *([f"inputs kept      {_inputs_kept(i)}"] if (i := r.get("inputs")) else []),
        *([f"calibration      ECE {100 * c['before']['ece']:.2f} -> {100 * c['after']['ece']:.2f} pp, "
           f"NLL {c['before']['nll']:.3f} -> {c['after']['nll']:.3f} (validation split)"]
          if (c := r.get("calibration_val")) else []),
        f"artifact         {r['artifact']}",
        f"original         {r['artifact_original']}",
        f"took             {r['seconds']:.1f} s",
    ]
    return render(["layer", "kind", "units", "params", "nonzero", "bits"], rows, notes=notes, right=(2, 3, 4, 5),
                  title=f"deepfleet compress {r['model']} on {r['data']} with {methods} (seed {r['seed']}, {r['device']})")


def _inputs_kept(i: dict[str, Any]) -> str:
    """What DeepIoT kept of the input (``deepiot.inputs``): sensors and their channels, or features."""
    features = f"{len(i['inputs_kept'])} of {i['inputs_total']} {i['unit']}s"
    if i["mode"] == "sensors":
        return f"{i['units_kept']} of {i['units']} sensors ({', '.join(i['sensors_kept'])}), {features}"
    return features


def front_table(summary: dict[str, Any]) -> str:
    """The Pareto front of a search summary: one row per trial, values rounded with units."""
    labels, units = summary["objectives"], summary.get("units", {})
    t = summary["trials"]
    title = (f"Pareto front of study {summary['study']!r}: {len(summary['pareto'])} trial(s) "
             f"({t.get('complete', 0)} complete, {t.get('failed', 0)} failed"
             + (f", {t['interrupted']} interrupted and re-run" if t.get("interrupted") else "") + ")")
    headers = ["trial", *(f"{lab} ({units[lab]})" if units.get(lab) else lab for lab in labels), "params"]
    rows = [(rec["trial"], *(f"{rec['values'][lab]:.4g}" for lab in labels),
             json.dumps(rec["params"], sort_keys=True)) for rec in summary["pareto"]]
    notes = [] if rows else ["(no feasible trial: loosen the constraints or run more trials)"]
    return render(headers, rows, title=title, notes=notes, right=tuple(range(len(labels) + 1)))


def check_table(checks: Sequence[Any]) -> str:
    """``deepfleet fleet check``: one row per device."""
    rows = [(c.device, c.device_class, "yes" if c.reachable else "NO", c.arch, c.python, c.runtimes, c.auto,
             c.energy, c.simulated) for c in checks]
    notes = ["(runtimes: installed on the device, with versions; auto: what `--backend auto` runs an artifact "
             "with model.onnx in, the first of the device's `backends:` that it has)"]
    return render(["device", "class", "ok", "arch", "python", "runtimes", "auto", "energy", "simulated"],
                  rows, notes=notes)
