"""DeviceSession ships the built one-file agent and checks that the agent answering is that file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deepfleet.device_agent import bundle
from deepfleet.errors import DeviceError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.transport import LocalTransport, RemoteProcess


def test_the_local_device_runs_the_built_agent(local_device: Device,
                                               fast_session: Callable[[Device], DeviceSession]) -> None:
    with fast_session(local_device) as session:
        hello = session.connect()
    shipped = Path(local_device.workdir) / "agent.py"
    assert shipped.read_bytes() == bundle.agent_source()  # the built file, not agent.py's source
    assert hello["agent_sha256"] == bundle.agent_sha256()
    assert hello["agent_version"] == bundle.agent_version()


def test_an_agent_that_is_not_the_uploaded_file_is_refused(
        local_device: Device, fast_session: Callable[[Device], DeviceSession],
        monkeypatch: pytest.MonkeyPatch) -> None:
    start = LocalTransport.start

    def start_after_another_upload(self: LocalTransport, argv: Any, **kw: Any) -> RemoteProcess:
        # another deepfleet replaces the file between this host's upload and the start
        Path(argv[1]).write_bytes(bundle.agent_source() + b"# another build\n")
        return start(self, argv, **kw)

    monkeypatch.setattr(LocalTransport, "start", start_after_another_upload)
    with fast_session(local_device) as session, \
            pytest.raises(DeviceError, match=r"device 'local': the agent at .*agent.py reports "
                                             r"sha256 .* not .* as uploaded.*`workdir:`"):
        session.connect()
    assert session.connects == 0
