"""Faults on demand for a running sandbox: cut or heal a link, power a device off or on.

Tests of the orchestrator and the agent use these to check that a dead link or device gives a
clear error in bounded time and that work resumes when it comes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepfleet.errors import DeviceError
from deepfleet.sandbox import _device, _netns, _state
from deepfleet.sandbox._up import default_state_dir

__all__ = ["cut_link", "heal_link", "start_device", "stop_device"]


def _find(state_dir: str | Path | None, name: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    directory = Path(state_dir or default_state_dir()).expanduser().resolve()
    state = _state.load(directory)
    if state is None:
        raise DeviceError(f"sandbox: no sandbox is up in {directory}")
    for rec in state["devices"]:
        if rec["name"] == name:
            return directory, state, rec
    raise DeviceError(f"sandbox: no device {name!r} in {directory}; devices: "
                      f"{', '.join(r['name'] for r in state['devices'])}")


def _ns(state_dir: str | Path | None, name: str) -> _netns.Netns:
    _, _, rec = _find(state_dir, name)
    if not rec.get("netns"):
        raise DeviceError(f"sandbox: device {name!r} runs on a loopback port, not in a network "
                          "namespace, so its link cannot be cut")
    return _netns.Netns(**rec["netns"])


def cut_link(name: str, *, state_dir: str | Path | None = None) -> None:
    """Silently drop all traffic to and from device ``name`` (packets vanish; no reset)."""
    _netns.cut(_ns(state_dir, name))


def heal_link(name: str, *, state_dir: str | Path | None = None) -> None:
    """Undo :func:`cut_link`."""
    _netns.heal(_ns(state_dir, name))


def stop_device(name: str, *, state_dir: str | Path | None = None) -> None:
    """Kill every process of device ``name`` (sshd and all sessions), like pulling its plug."""
    _, _, rec = _find(state_dir, name)
    _device.stop_processes(rec)


def start_device(name: str, *, state_dir: str | Path | None = None) -> None:
    """Start device ``name``'s sshd again (same address, port and host key)."""
    directory, state, rec = _find(state_dir, name)
    _device.start_sshd(rec, lambda: _state.save(directory, state))
