"""A session with the agent on one device: deploy, start once, measure many times.

``DeviceSession`` connects lazily. On first use it uploads the agent (the one file that
:mod:`deepfleet.device_agent.bundle` builds from the device program and its libraries) as
``agent.py`` into the device's work directory (only when its hash changed), starts ``python3
agent.py serve`` as one persistent process over one channel, and checks its ``hello``: the agent
that answers must report the sha256 of the file this host shipped. Artifacts are uploaded only when the agent
reports them missing (or corrupt), so a measurement of a known artifact costs one round trip.
A request that misses its deadline (hung agent, cut link, dead device) kills the agent and
closes the connection; the next call starts afresh, so the session recovers when the device
comes back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from deepfleet.artifact import artifact_files
from deepfleet.device_agent import bundle
from deepfleet.errors import DeviceError
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.transport import RemoteProcess, Transport, open_transport

HELLO_TIMEOUT_S = 60.0  # the first start of Python + numpy on an emulated ARM board is slow
MARGIN_S = 30.0  # beyond the agent's own worst case for a measure request


def energy_request(device: Device) -> dict[str, Any]:
    """The agent's ``energy`` settings for ``device``.

    A sensor that the fleet file marks simulated (``energy.simulated``) is passed on as such, so
    the agent labels its readings ``simulated``. The device's own ``simulated`` note (an
    emulated CPU, a shaped link) says nothing about the sensor and is not passed.
    """
    e = device.energy
    out: dict[str, Any] = {"source": e.source, "sample_hz": e.sample_hz}
    if e.path:
        out["path"] = e.path
    if e.command:
        out["command"] = list(e.command)
    if e.simulated:
        out["simulated"] = e.simulated
    return out


def measure_deadline(req: dict[str, Any], margin_s: float = MARGIN_S) -> float:
    """Seconds a ``measure`` request may take: the agent's own worst case plus ``margin_s``."""
    thermal = req.get("thermal") or {}
    energy = req.get("energy") or {}
    return (float(thermal.get("settle_max_s", 30.0)) + float(energy.get("idle_s", 0.5))
            + float(req.get("max_seconds", 30.0)) + 2 * float(req.get("min_seconds", 1.0)) + margin_s)


class DeviceSession:
    """The agent on one device. Not thread-safe: one request at a time (a device is exclusive).

    ``hello_timeout_s`` bounds starting the agent (upload check, Python + numpy start, hello);
    ``deadline_margin_s`` is added to a measure request's own worst case (see
    :func:`measure_deadline`) before the request counts as hung. ``transport_options`` go to
    :func:`~deepfleet.orchestrator.transport.open_transport` (e.g. SSH ``timeouts``).
    """

    def __init__(self, device: Device, *, hello_timeout_s: float = HELLO_TIMEOUT_S,
                 deadline_margin_s: float = MARGIN_S, **transport_options: Any) -> None:
        self.device = device
        self.hello_timeout_s = hello_timeout_s
        self.deadline_margin_s = deadline_margin_s
        self._options = transport_options
        self._transport: Transport | None = None
        self._proc: RemoteProcess | None = None
        self._workdir = ""
        self.hello: dict[str, Any] = {}
        self.connects = 0  # how many times the agent was (re)started
        self.uploads = 0  # artifact files sent

    # -- lifetime
    def __enter__(self) -> DeviceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Say bye to the agent (best effort) and release the connection."""
        if self._proc is not None:
            try:
                self._proc.request({"op": "bye"}, timeout=5.0)
            except DeviceError:
                pass
            self._proc.kill()
        self._proc = None
        if self._transport is not None:
            self._transport.close()
        self._transport = None

    def _reset(self) -> None:
        """Forget the agent and the connection after a failure; the next call reconnects."""
        if self._proc is not None:
            self._proc.kill()
        self._proc = None
        if self._transport is not None:
            self._transport.close()
        self._transport = None

    def connect(self) -> dict[str, Any]:
        """Deploy and start the agent if it is not running; return its ``hello``."""
        if self._proc is not None and self._proc.poll() is None:
            return self.hello
        self._reset()
        transport = open_transport(self.device, **self._options)
        proc: RemoteProcess | None = None
        timeout = self.hello_timeout_s
        try:
            up = transport.upload_if_changed(bundle.agent_file(),
                                              f"{self.device.workdir.rstrip('/')}/agent.py",
                                              timeout=timeout)
            self._workdir = up.path.rsplit("/", 1)[0]
            proc = transport.start([self.device.python, up.path, "serve"], timeout=timeout)
            hello = proc.request({"op": "hello", "energy": energy_request(self.device)}, timeout=timeout)
        except DeviceError as exc:
            if proc is not None:
                proc.kill()
            transport.close()
            raise self._explain(exc) from exc
        if not hello.get("ok"):
            proc.kill()
            transport.close()
            raise DeviceError(f"device {self.device.name!r}: the agent refused hello: {hello.get('error')}")
        if hello.get("agent_sha256") != up.sha256:
            proc.kill()
            transport.close()
            raise DeviceError(
                f"device {self.device.name!r}: the agent at {up.path} reports sha256 "
                f"{str(hello.get('agent_sha256'))[:12]}... (version {hello.get('agent_version')}), "
                f"not {up.sha256[:12]}... as uploaded: another deepfleet may share the work "
                f"directory {self._workdir}; give each its own `workdir:` in the fleet file")
        self._transport, self._proc, self.hello = transport, proc, hello
        self.connects += 1
        return hello

    # -- work
    def _explain(self, exc: DeviceError) -> DeviceError:
        """A clearer error for the start-up failures that have one known cause and fix."""
        text = str(exc)
        if "No module named 'numpy'" in text:
            return DeviceError(
                f"device {self.device.name!r}: the interpreter {self.device.python!r} has no numpy, "
                "which the agent needs (Python >= 3.8 with numpy): install it on the device "
                "(Debian: apt install python3-numpy) or set `python:` in fleet.yaml to an "
                f"interpreter that has it. ({text})")
        return exc

    def _upload_artifact(self, artifact: Path) -> str:
        assert self._transport is not None
        remote = f"{self._workdir}/artifacts/{artifact.name}"
        try:
            for name in artifact_files(artifact):  # model.onnx too, for backend onnxruntime
                if self._transport.upload_if_changed(artifact / name, f"{remote}/{name}").uploaded:
                    self.uploads += 1
        except DeviceError:
            self._reset()  # the link may be gone: do not trust the agent's connection either
            raise
        return remote

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request to the agent; on a transport failure reset and raise DeviceError."""
        self.connect()
        assert self._proc is not None
        try:
            return self._proc.request(req, timeout=timeout)
        except DeviceError:
            self._reset()
            raise

    def measure(self, artifact: str | Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Measure the artifact directory ``artifact`` (on this machine) on the device.

        ``settings`` are agent ``measure`` fields (warm-up, runs, seconds, batch, threads,
        backend, ...); the device's energy settings, backend preference (what ``backend: auto``
        walks) and stated power are added unless given. Returns the agent's successful response with
        ``device``, ``device_class`` and ``wall_ms`` added. Raises DeviceError naming the device
        and the cause.
        """
        artifact = Path(artifact)
        req: dict[str, Any] = {"op": "measure", **(settings or {})}
        req.setdefault("energy", energy_request(self.device))
        req.setdefault("backends", list(self.device.backends))
        if self.device.power is not None:
            req.setdefault("power", self.device.power.request())
        t0 = time.perf_counter()
        self.connect()
        req["artifact"] = f"{self._workdir}/artifacts/{artifact.name}"
        deadline = measure_deadline(req, self.deadline_margin_s)
        resp = self.request(req, timeout=deadline)
        if not resp.get("ok") and resp.get("kind") in ("artifact_missing", "artifact_corrupt"):
            self._upload_artifact(artifact)  # first sight of this artifact, or a damaged copy
            resp = self.request(req, timeout=deadline)
        if not resp.get("ok"):
            raise DeviceError(
                f"device {self.device.name!r}: measuring {artifact.name[:12]} failed "
                f"({resp.get('kind')}): {resp.get('error')}"
            )
        resp["device"], resp["device_class"] = self.device.name, self.device.device_class
        resp["wall_ms"] = 1000 * (time.perf_counter() - t0)
        return resp
