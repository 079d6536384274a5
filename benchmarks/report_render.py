"""Benchmark of ``deepfleet report`` on a large run (issue: fleet benchmarking reports).

Writes a synthetic search run with the real writers (``tests/report/runs.py``: agent-shaped
responses through ``measurement_row`` and ``write_results``, candidates through
``write_candidates``) of at least ``--rows`` measurement rows, then times:

* ``seconds``  the command a user runs, ``python -m deepfleet.cli report RUN --out ...``, as a
               fresh process (imports included), wall clock; the goal is <= 30 s on 2 cores;
* ``phases_s`` the same work in this process, phase by phase (load, build, render, write).

Prints the JSON and saves it to ``benchmarks/results/report_render.json``.

    PYTHONPATH=src python benchmarks/report_render.py [--rows 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the run generator lives with the tests (tests/report/runs.py)

from deepfleet.report import _build, _html, _load, _markdown, _write  # noqa: E402
from tests.report.runs import ClassSpec, make_run  # noqa: E402

LIMIT_S = 30.0
CLASSES = {  # 12 devices in 3 classes, one per energy kind
    "edison": ClassSpec(devices=4, base_ms=50.2, energy="simulated", arch="i686", power_w=0.95),
    "pi4": ClassSpec(devices=5, base_ms=12.0, energy="estimated", arch="aarch64", power_w=3.2),
    "x86": ClassSpec(devices=3, base_ms=1.5, energy="measured", power_w=15.0),
}
TRIALS, RUNS_PER_ROW = 400, 30


def _generate(root: Path, rows: int) -> tuple[int, float]:
    """Write the run; return (rows written, seconds). Repeats scale the rows to ``rows``."""
    devices = sum(c.devices for c in CLASSES.values())
    per_repeat = devices * (TRIALS - 2) * 1.1  # measured trials + baseline, plus drift checks
    repeats = max(1, -(-rows // int(per_repeat)))
    t = time.perf_counter()
    info = make_run(root, trials=TRIALS, repeats=repeats, runs=RUNS_PER_ROW, classes=CLASSES,
                    reference_every=10, failures=20)
    return info.rows, time.perf_counter() - t


def _phases(root: Path, out: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    t = time.perf_counter()
    run = _load.load_run(root)
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    report = _build.build(run, max_drop_pp=0.5)
    times["build (tables and plots)"] = time.perf_counter() - t
    t = time.perf_counter()
    names = _write.output_paths(out)
    html = _html.render_html(report, tables_dir=names.tables.name)
    md = _markdown.render_markdown(report, html_name=out.name, tables_dir=names.tables.name)
    times["render"] = time.perf_counter() - t
    t = time.perf_counter()
    _write.write_all(out, html, md, {x.name: x.frame for x in report.tables if x.csv})
    times["write"] = time.perf_counter() - t
    return {k: round(v, 3) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="at least this many rows")
    ap.add_argument("--keep", type=Path, default=None, help="write the run here and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        root = args.keep or Path(tmp) / "run"
        rows, gen_s = _generate(root, args.rows)
        out = Path(tmp) / "out" / "report.html"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        load_before = [round(v, 2) for v in os.getloadavg()]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "deepfleet.cli", "report", str(root),
                               "--out", str(out)], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"deepfleet report failed ({proc.returncode}): {proc.stderr}")
        csv_bytes = sum(p.stat().st_size for p in out.with_name("report_tables").glob("*.csv"))
        result: dict[str, Any] = {
            "rows": rows,
            "latencies_per_row": RUNS_PER_ROW,
            "trials": TRIALS,
            "devices": sum(c.devices for c in CLASSES.values()),
            "classes": len(CLASSES),
            "seconds": round(seconds, 2),
            "limit_s": LIMIT_S,
            "within_limit": seconds <= LIMIT_S,
            "html_bytes": out.stat().st_size,
            "markdown_bytes": out.with_suffix(".md").stat().st_size,
            "csv_bytes": csv_bytes,
            "figures": out.read_text().count('<img class="plot"'),
            "phases_s": _phases(root, Path(tmp) / "out2" / "report.html"),
            "generate_s": round(gen_s, 1),
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_before_timing": load_before},
            "cli_output": proc.stdout.strip().splitlines(),
        }
    text = json.dumps(result, indent=1)
    print(text)
    dest = REPO / "benchmarks" / "results" / "report_render.json"
    dest.write_text(text + "\n")
    print(f"saved {dest}", file=sys.stderr)


if __name__ == "__main__":
    main()
