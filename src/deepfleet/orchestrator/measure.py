"""Measure artifacts on devices: every artifact on every device, each row written as it comes.

:func:`measure_many` is the one place that turns "these artifacts on these devices" into rows of
the results dataset. Devices work in parallel (one thread and one
:class:`~deepfleet.orchestrator.device.DeviceSession` each); on a device the artifacts are
measured in the order given. Every measurement, good or failed, becomes one row that is written
to Parquet as soon as it exists, so a device, link or driver that dies later loses nothing
already measured. The call returns every (device, artifact) outcome; it never stops at the
first failure. Before a device's first measurement and after every ``reference_every``
measurements it re-measures the reference model (:mod:`~deepfleet.orchestrator.reference`) and
records the device's drift on the rows.

Input errors (a missing or corrupt artifact, a duplicate device, a bad setting) raise before
any device is contacted and before anything is written.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepfleet.artifact import Artifact, open_artifact
from deepfleet.device_agent.format import compressor_label
from deepfleet.device_agent.protocol import AgentError, parse_measure
from deepfleet.errors import ConfigError, DeepfleetError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.reference import (
    REFERENCE_BACKENDS,
    REFERENCE_REQUEST,
    ReferenceTracker,
    reference_artifact,
)
from deepfleet.orchestrator.results import failure_row, measurement_row, write_results
from deepfleet.sensing import sensing_energy

__all__ = ["MeasureSettings", "Outcome", "measure_many"]

log = logging.getLogger(__name__)

# Fields of the caller's request that the reference measurement copies, so that the reference
# runs pinned and threaded like the candidates it stands next to.
_SHARED_WITH_REFERENCE = ("threads", "cpus", "thermal", "disable_gc", "backend")
MAX_PARALLEL_DEVICES = 32  # threads mostly wait on sockets; this only bounds a huge fleet

SessionFactory = Callable[[Device], DeviceSession]


@dataclass(frozen=True, kw_only=True)
class MeasureSettings:
    """How to measure (plain data).

    ``request``: agent ``measure`` fields (warmup, min_runs, max_runs, min_seconds,
    max_seconds, batch, threads, cpus, ci_target, thermal, energy, ...; see the protocol comment
    in ``device_agent/protocol.py``); the device's fleet-file energy settings apply unless ``energy`` is given.
    ``reference_every``: re-measure the reference model before a device's first measurement and
    after every this many (0: never). ``reference_request``: fields that override
    :data:`~deepfleet.orchestrator.reference.REFERENCE_REQUEST` for the reference.
    Raises ConfigError for a field the agent would refuse.
    """

    request: Mapping[str, Any] = field(default_factory=dict)
    reference_every: int = 10
    reference_request: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        every = self.reference_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(f"reference_every must be an integer >= 0 (0: no reference), but "
                              f"got {every!r}")
        for name, req in (("request", self.request), ("reference request", self.reference())):
            for key in ("op", "id", "artifact"):
                if key in req:
                    raise ConfigError(f"measure settings: {name} must not set {key!r}; "
                                      "measure_many sets it per artifact")
            try:
                parse_measure({"op": "measure", "artifact": "-", **req})
            except AgentError as exc:
                raise ConfigError(f"measure settings: {name}: {exc}") from None

    def reference(self) -> dict[str, Any]:
        """The agent request for the reference model (without ``artifact``)."""
        shared = {k: self.request[k] for k in _SHARED_WITH_REFERENCE if k in self.request}
        if shared.get("backend", "auto") not in ("auto", *REFERENCE_BACKENDS):
            del shared["backend"]  # the reference has no file for it (REFERENCE_BACKENDS)
        return {**REFERENCE_REQUEST, **shared, **self.reference_request}


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What happened to one (device, artifact) measurement, and the row that records it.

    ``ok`` is True when the device measured it and its row was written; otherwise ``error``
    names the device and the cause. ``energy_mj`` is measured or simulated energy per run of
    ``batch`` samples (``energy_kind`` says which; None with no sensor, when
    ``estimated_energy_mj`` is the operation-count estimate); ``time_estimated_energy_mj`` is
    the time-based estimate (busy time x the device's stated power; None without one). Each
    is its own kind: never combined. ``backend`` is the runtime that ran (``backend_note`` says
    why ``auto`` passed over a preferred one); ``init_ms``, ``memory_peak_mb`` and
    ``cpu_p50_ms`` as in the results schema. ``drift`` is the device's reference drift (see the
    results schema). ``rows_written`` is 1 once the row is in Parquet.
    """

    device: str
    artifact: str
    artifact_hash: str
    reference: bool
    ok: bool
    error: str | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    energy_mj: float | None
    estimated_energy_mj: float | None
    energy_kind: str | None
    energy_source: str | None
    time_estimated_energy_mj: float | None
    backend: str | None
    backend_note: str | None
    init_ms: float | None
    memory_peak_mb: float | None
    cpu_p50_ms: float | None
    drift: float | None
    rows_written: int
    row: dict[str, Any] = field(repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """The outcome as plain JSON-ready data, without the row."""
        return {**{k: getattr(self, k) for k in (
            "device", "artifact", "artifact_hash", "reference", "ok", "backend", "backend_note",
            "p50_ms", "p90_ms", "p99_ms", "cpu_p50_ms", "init_ms", "memory_peak_mb", "energy_mj",
            "estimated_energy_mj", "time_estimated_energy_mj", "energy_kind", "energy_source",
            "drift", "rows_written", "error")}, "sensing_energy_mj": self.row.get("sensing_energy_mj")}


@dataclass(frozen=True, kw_only=True)
class _Context:
    """What every device thread of one measure_many call shares."""

    root: Path
    study: str
    trial: int | None
    settings: MeasureSettings
    tracker: ReferenceTracker
    reference: Artifact | None
    emit: Callable[[Outcome], None]
    stop: threading.Event  # set on Ctrl-C: each device finishes its current measurement only


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _record(ctx: _Context, row: dict[str, Any], given: str) -> Outcome:
    """Write ``row`` now (one file: nothing measured waits for later ones) and describe it."""
    error = row.get("error")
    try:
        write_results(ctx.root, [row])
        written = 1
    except (DeepfleetError, OSError) as exc:
        written = 0
        error = (f"{error}; " if error else "") + f"the row could not be written to {ctx.root}: {exc}"
        log.error("device %s: %s", row["device"], error)
    return Outcome(
        device=row["device"], artifact=given, artifact_hash=row["artifact_hash"],
        reference=bool(row["reference"]), ok=error is None, error=error,
        p50_ms=row.get("p50_ms"), p90_ms=row.get("p90_ms"), p99_ms=row.get("p99_ms"),
        energy_mj=row.get("energy_per_inference_mj"),
        estimated_energy_mj=row.get("estimated_energy_mj"), energy_kind=row.get("energy_kind"),
        energy_source=row.get("energy_source"),
        time_estimated_energy_mj=row.get("time_estimated_energy_mj"), backend=row.get("backend"),
        backend_note=row.get("backend_note"), init_ms=row.get("init_ms"),
        memory_peak_mb=row.get("memory_peak_mb"), cpu_p50_ms=row.get("cpu_p50_ms"),
        drift=row.get("drift"), rows_written=written, row=row,
    )


def _failure(ctx: _Context, session: DeviceSession, art: Artifact, *, reference: bool,
             error: str, started: dt.datetime) -> dict[str, Any]:
    device, hello, manifest = session.device, session.hello, art.manifest
    method = compressor_label(manifest.get("compressor"))
    return failure_row(
        study=ctx.study, device=device.name, device_class=device.device_class,
        artifact_hash=art.digest, error=error, trial=ctx.trial, reference=reference,
        started_at=started, ended_at=_now(), arch=hello.get("machine"),
        simulated=device.simulated, model_name=manifest.get("model"), compressor=method,
        params=manifest.get("params"), macs=manifest.get("macs"), artifact_bytes=art.bytes,
        agent_version=hello.get("agent_version"), device_python=hello.get("python"),
        device_numpy=hello.get("numpy"), drift=ctx.tracker.drift(device.name),
    )


def _measure_one(ctx: _Context, session: DeviceSession, art: Artifact, *,
                 reference: bool = False) -> dict[str, Any]:
    """Measure ``art`` and return its row (a failure row if the device failed)."""
    device = session.device
    request = ctx.settings.reference() if reference else dict(ctx.settings.request)
    started = _now()
    try:
        resp = session.measure(art.path, request)
    except DeepfleetError as exc:
        return _failure(ctx, session, art, reference=reference, error=str(exc), started=started)
    if reference:
        drift: float | None = ctx.tracker.record(device.name, float(resp["p50_ms"]))
    else:
        drift = ctx.tracker.drift(device.name)
    sensing = sensing_energy(art.manifest, device.sensor_mw, batch=int(resp.get("batch") or 1),
                             device=device.name)
    return measurement_row(resp, study=ctx.study, device=device.name,
                           device_class=device.device_class, trial=ctx.trial,
                           reference=reference, simulated=device.simulated,
                           artifact_bytes=art.bytes, drift=drift, sensing=sensing)


def _device_work(ctx: _Context, session: DeviceSession,
                 artifacts: Sequence[tuple[str, Artifact]]) -> list[Outcome]:
    """Measure every artifact on one device, in order; return every outcome."""
    outcomes: list[Outcome] = []

    def emit(row: dict[str, Any], given: str) -> None:
        outcomes.append(_record(ctx, row, given))
        ctx.emit(outcomes[-1])

    name = session.device.name
    unreachable: str | None = None
    for given, art in artifacts:
        if ctx.stop.is_set():
            break
        started = _now()
        try:
            if unreachable is not None:
                # Retrying a device that could not be reached costs a connect timeout per
                # artifact and cannot succeed within this call: record why instead.
                emit(_failure(ctx, session, art, reference=False, started=started,
                              error=f"not measured: {unreachable}"), given)
                continue
            try:
                session.connect()
            except DeepfleetError as exc:
                unreachable = str(exc)
                emit(_failure(ctx, session, art, reference=False, error=str(exc),
                              started=started), given)
                continue
            if ctx.reference is not None and ctx.tracker.due(name, ctx.settings.reference_every):
                emit(_measure_one(ctx, session, ctx.reference, reference=True),
                     str(ctx.reference.path))
            ctx.tracker.counted(name)
            emit(_measure_one(ctx, session, art), given)
        except Exception as exc:  # a bug must not cost the other artifacts and devices
            log.exception("device %s: internal error measuring %s", name, given)
            emit(_failure(ctx, session, art, reference=False, started=started,
                          error=f"internal error in the driver: {type(exc).__name__}: {exc}"),
                 given)
    return outcomes


def _open_all(artifacts: Sequence[str | os.PathLike[str]]) -> list[tuple[str, Artifact]]:
    opened = []
    for path in artifacts:
        if not Path(path).is_dir():
            raise ConfigError(f"artifact {str(path)!r} does not exist or is not a directory; give "
                              "an artifact directory written by 'deepfleet compress'")
        opened.append((str(path), open_artifact(path)))  # ArtifactError if corrupt
    return opened


def measure_many(
    devices: Sequence[Device],
    artifacts: Sequence[str | os.PathLike[str]],
    *,
    results_root: str | os.PathLike[str],
    settings: MeasureSettings | None = None,
    study: str = "measure",
    trial: int | None = None,
    tracker: ReferenceTracker | None = None,
    sessions: MutableMapping[str, DeviceSession] | None = None,
    session_factory: SessionFactory = DeviceSession,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Measure every artifact on every device and write one row per measurement.

    ``devices`` are measured in parallel (one thread and one session each), the ``artifacts``
    (directories) in order on each. Rows go to the dataset at ``results_root`` under ``study``
    (and ``trial``) as each measurement ends. ``tracker`` carries reference drift across calls
    (a new one per call if None). ``sessions`` (device name -> session) are reused and left
    open for the caller to close; without it sessions are made by ``session_factory`` and
    closed here. ``on_outcome`` is called (one call at a time) as each outcome is recorded.

    Returns the outcomes of every device, in device order, each device's in measured order
    (reference measurements included, with ``reference=True``). On KeyboardInterrupt each
    device finishes (and records) its current measurement, starts no other, and the interrupt
    is raised again. Raises ConfigError or
    ArtifactError, before contacting any device or writing anything, for a missing or corrupt
    artifact, a duplicate device name, an empty study or bad settings.
    """
    settings = settings if settings is not None else MeasureSettings()
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"device(s) {dup} given more than once; a device measures one thing at "
                          "a time, so name each once")
    if not study or "/" in study:
        raise ConfigError(f"study must be a non-empty name without '/', but got {study!r}")
    opened = _open_all(artifacts)
    if not devices or not opened:
        return []
    lock = threading.Lock()

    def emit(outcome: Outcome) -> None:
        if on_outcome is not None:
            with lock:
                on_outcome(outcome)

    ctx = _Context(root=Path(results_root), study=study, trial=trial, settings=settings,
                   tracker=tracker if tracker is not None else ReferenceTracker(),
                   reference=reference_artifact() if settings.reference_every else None,
                   emit=emit, stop=threading.Event())

    def one_device(device: Device) -> list[Outcome]:
        if sessions is None:
            with session_factory(device) as session:
                return _device_work(ctx, session, opened)
        with lock:
            session = sessions.get(device.name) or sessions.setdefault(
                device.name, session_factory(device))
        return _device_work(ctx, session, opened)

    with ThreadPoolExecutor(max_workers=min(len(devices), MAX_PARALLEL_DEVICES),
                            thread_name_prefix="measure") as pool:
        futures = [pool.submit(one_device, d) for d in devices]
        try:
            pending = set(futures)
            while pending:  # short waits: a wait without a timeout does not see Ctrl-C
                pending = wait(pending, timeout=0.2).not_done
            per_device = [f.result() for f in futures]
        except KeyboardInterrupt:
            # Rows of finished measurements are on disk already; let each device finish the
            # one it is on (its row is written too) and start no other, then stop.
            ctx.stop.set()
            raise
    return [o for outcomes in per_device for o in outcomes]
