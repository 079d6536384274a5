"""The sandbox's state file: what ``up`` created, so that ``down`` can undo exactly that.

``state.json`` is rewritten atomically after every step of ``up`` (a crash mid-way still leaves
a record ``down`` can clean up). Device records are plain dicts; :func:`read_state` gives the
public, typed view.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SandboxDevice", "SandboxState", "load", "read_state", "save", "state_file"]


@dataclass(frozen=True, kw_only=True)
class SandboxDevice:
    """One started sandbox device, as recorded (``netns`` None for a loopback device).

    ``onnxruntime`` is the version its Python can import (None: numpy only, ``onnxruntime_note``
    says why).
    """

    name: str
    kind: str
    device_class: str
    host: str
    port: int
    mode: str
    netns: str | None
    root: str | None
    power_dir: str | None
    simulated: str | None
    onnxruntime: str | None = None
    onnxruntime_note: str | None = None


@dataclass(frozen=True, kw_only=True)
class SandboxState:
    """What ``up`` started and what it skipped (device name -> reason)."""

    directory: Path
    fleet_file: Path
    devices: tuple[SandboxDevice, ...]
    skipped: dict[str, str]


def state_file(directory: Path) -> Path:
    return directory / "state.json"


def load(directory: Path) -> dict[str, Any] | None:
    """The raw state of the sandbox in ``directory``, or None if there is none."""
    path = state_file(directory)
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def save(directory: Path, state: dict[str, Any]) -> None:
    path = state_file(directory)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_state(directory: str | Path) -> SandboxState | None:
    """The typed view of the sandbox in ``directory`` (None if no sandbox is up there)."""
    directory = Path(directory).expanduser().resolve()
    raw = load(directory)
    if raw is None:
        return None
    devices = tuple(
        SandboxDevice(
            name=d["name"], kind=d["kind"], device_class=d["device_class"], host=d["host"],
            port=d["port"], mode=d["mode"], netns=(d.get("netns") or {}).get("name"),
            root=d.get("root"), power_dir=d.get("power_dir"), simulated=d.get("simulated"),
            onnxruntime=d.get("onnxruntime"), onnxruntime_note=d.get("onnxruntime_note"),
        )
        for d in raw["devices"] if d.get("started")
    )
    return SandboxState(directory=directory, fleet_file=directory / "fleet.yaml",
                        devices=devices, skipped=dict(raw.get("skipped", {})))
