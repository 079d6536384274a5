"""Results files of the development benchmarks: one JSON object per file, one entry per case."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepfleet._files import write_json

Merge = Callable[[dict[str, Any] | None, dict[str, Any]], dict[str, Any]]


def save_case(out: Path, key: str, entry: dict[str, Any], *, merge: Merge | None = None) -> None:
    """Store ``entry`` (plus the machine it ran on: jobs use one torch thread each) under ``key``
    in the JSON file ``out``, keeping the file's other cases. With ``merge``, the stored entry is
    ``merge(previous entry or None, entry)`` instead of ``entry``. The write is atomic."""
    results = json.loads(out.read_text()) if out.exists() else {}
    entry = entry | {"machine": {"cpu_count": os.cpu_count(), "torch_threads_per_job": 1}}
    results[key] = merge(results.get(key), entry) if merge else entry
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(f"saved {out}")
