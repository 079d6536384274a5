"""Small file helpers shared by modules that must not import torch (sandbox, agent tooling)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """deepfleet's cache: ``$DEEPFLEET_CACHE`` (when set and non-empty) or ``~/.cache/deepfleet``."""
    return Path(os.environ.get("DEEPFLEET_CACHE") or Path.home() / ".cache" / "deepfleet")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same folder, then
    rename): a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
