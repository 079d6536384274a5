"""Timed runs of the real ``deepfleet compress`` CLI, each in a fresh process with an empty cache
(shared by ``compress.py``'s timing part and ``cuda_compress.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEEP = ("device", "seed", "kept_params", "accuracy_before", "accuracy_after", "extraction_error",
        "search_iterations", "seconds")


def _start(device: str, seed: int, tmp: Path, cores: str | None, threads: int | None) -> subprocess.Popen[str]:
    env = {**os.environ, "DEEPFLEET_CACHE": str(tmp / f"cache-{device}-{seed}")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "deepfleet.cli", "compress", "lenet5", "--data", "digits", "--json",
           "--seed", str(seed), "--device", device, "--out", str(tmp / f"out-{device}-{seed}")]
    if cores:
        cmd = ["taskset", "-c", cores, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"compress failed (exit {proc.returncode}):\n{err[-3000:]}")
    r = json.loads(out)
    return {k: r.get(k) for k in KEEP}


def compress_batch(device: str, seeds: list[int], *, cores: str | None = None,
                   threads: int | None = None) -> dict[str, Any]:
    """``compress lenet5 --data digits`` once per seed, all at the same time on ``device``
    (pinned to ``cores`` with taskset, ``threads`` as OMP_NUM_THREADS when given); the wall
    time of the whole batch and each run's figures."""
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        procs = [_start(device, s, Path(d), cores, threads) for s in seeds]
        runs = [_finish(p) for p in procs]
        wall = time.perf_counter() - t
    return {"device": device, "cores": cores or "all", "threads": threads or "default", "runs": runs,
            "wall_seconds": round(wall, 1), "runs_per_minute": round(60 * len(seeds) / wall, 2)}
