"""The SSH and lenet5 parts of ``agent_overhead.py`` (see its docstring for what each measures).

Both go through the real orchestrator path: :class:`DeviceSession` over Paramiko to real sshd
servers (a loopback one started here; sandbox devices in network namespaces for lenet5).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from agent_overhead import _artifact  # type: ignore[import-not-found]
from agent_overhead import _pct as _percentile  # type: ignore[import-not-found]

from deepfleet.errors import DeviceError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import LOCAL_DEVICE, Device, EnergySpec, load_fleet
from deepfleet.sandbox import LoopbackSshd

# 1 BLAS thread on one CPU, the agent's CI-of-the-median rule (95 % CI within 2 % of the p50).
PINNED: dict[str, Any] = {"threads": 1, "warmup": 20, "min_seconds": 1.0, "max_seconds": 10.0,
                          "ci_target": 0.02, "thermal": {"settle_max_s": 0}}


def _loadavg() -> list[float]:
    return list(os.getloadavg())


def _pct(values: list[float], q: float) -> float:
    return round(_percentile(values, q), 4)


def _repeat(session: DeviceSession, artifact: Path, request: dict[str, Any],
            repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        r = session.measure(artifact, request)
        runs.append({"p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "p99_ms": r["p99_ms"],
                     "ci_rel_width": r["ci_rel_width"], "runs": r["runs"],
                     "stop_reason": r["stop_reason"], "threads": r["threads"],
                     "affinity": r["affinity"], "wall_s": round(r["wall_ms"] / 1e3, 3)})
    p50s = [x["p50_ms"] for x in runs]
    cv = statistics.stdev(p50s) / statistics.mean(p50s) if len(p50s) > 1 else None
    return {"p50_ms": p50s, "cv": round(cv, 5) if cv is not None else None, "runs": runs}


def run_ssh(*, requests: int, repeats: int, cpu: int) -> dict[str, Any]:
    """First contact, ping, per-measurement overhead and repeatability over loopback SSH."""
    load_start = _loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = _artifact(root / "artifacts", "mlp", (1, 28, 28))
        lenet = _artifact(root / "artifacts", "lenet5", (1, 28, 28))
        server = LoopbackSshd(root / "sshd", name="bench", client_key=root / "id_ed25519")
        server.start()
        try:
            known = root / "known_hosts"
            known.write_text(server.known_hosts_line + "\n")
            device = Device(name="loopback", device_class="x86", host="127.0.0.1",
                            port=server.port, user=server.user, key=root / "id_ed25519",
                            known_hosts=known, python=sys.executable,
                            workdir=str(root / "work"), energy=EnergySpec(source="none"))
            t0 = time.perf_counter()
            with DeviceSession(device) as cold:
                hello = cold.connect()  # empty work dir: agent.py is uploaded
            first_contact = time.perf_counter() - t0
            t0 = time.perf_counter()
            session = DeviceSession(device)
            session.connect()  # agent.py already there: only its hash is checked
            reconnect = time.perf_counter() - t0
            try:
                pings = []
                for _ in range(requests):
                    t = time.perf_counter()
                    assert session.request({"op": "ping"}, timeout=10)["ok"]
                    pings.append((time.perf_counter() - t) * 1e3)
                quick = {"warmup": 0, "min_runs": 5, "max_runs": 5, "min_seconds": 0,
                         "ci_target": None, "threads": 1, "cpus": [cpu],
                         "thermal": {"settle_max_s": 0},
                         "fresh": False, "backend": "numpy"}  # the session's own cost, as recorded
                first = session.measure(small.path, quick)  # uploads the artifact
                overheads, inside = [], []
                for _ in range(requests):
                    r = session.measure(small.path, quick)
                    own = r["timing_ms"]["warmup"] + sum(r["latencies_ms"])
                    overheads.append(r["wall_ms"] - own)
                    inside.append(r["timing_ms"]["total"] - own)
                repeat = _repeat(session, lenet.path, {**PINNED, "cpus": [cpu]}, repeats)
            finally:
                session.close()
        finally:
            server.kill()
    return {
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "cpu_model": hello["cpu_model"], "cpu_count": hello["cpu_count"],
                    "loadavg_at_start": load_start, "loadavg_at_end": _loadavg()},
        "transport": "Paramiko to sshd on 127.0.0.1 (loopback), one persistent agent",
        "first_contact_s": round(first_contact, 4),
        "reconnect_s": round(reconnect, 4),
        "ping_ms": {"p50": _pct(pings, 50), "p90": _pct(pings, 90), "n": len(pings)},
        "overhead_ms": {
            "definition": "DeviceSession.measure wall time minus warm-up time and the sum of the "
                          "timed latencies (5 runs of mlp/28x28, cached artifact, pinned)",
            "p50": _pct(overheads, 50), "p90": _pct(overheads, 90),
            "inside_agent_p50": _pct(inside, 50), "n": len(overheads),
        },
        "first_measure_wall_ms": round(first["wall_ms"], 3),
        "repeat": {"artifact": f"lenet5 (random weights), batch 1, 1 BLAS thread on CPU {cpu}, "
                               "ci_target 0.02, min 1 s, max 10 s", **repeat},
    }


def _lenet_devices(tmp: Path) -> tuple[list[Device], str | None, Any]:
    """The local device, plus sandbox x86 and edison devices when this machine can run them."""
    local = dataclasses.replace(LOCAL_DEVICE, workdir=str(tmp / "local-work"))
    if os.geteuid() != 0:
        return [local], "not root: no sandbox devices", None
    from deepfleet.sandbox import up

    state = tmp / "sandbox"
    try:
        fleet = load_fleet(up(["x86", "edison"], state_dir=state))
    except Exception as exc:  # noqa: BLE001 - report why and measure the local device alone
        return [local], f"sandbox could not start: {exc}", None
    return [local, *fleet], None, state


def run_lenet(summary: dict[str, Any], *, cpu: int) -> dict[str, Any]:
    """Compressed vs original lenet5 p50 (and energy) per device, batch 1 and 64."""
    arts = {"compressed": Path(summary["artifact"]), "original": Path(summary["artifact_original"])}
    load_start = _loadavg()
    compress = {k: summary.get(k) for k in (
        "params_before", "params_after", "macs_before", "macs_after", "accuracy_before",
        "accuracy_after", "bytes_before", "bytes_after", "layers", "seconds")}
    out: dict[str, Any] = {"artifacts": {k: v.name for k, v in arts.items()},
                           "compress": compress, "settings": {**PINNED, "cpus": [cpu]},
                           "devices": {}}
    with tempfile.TemporaryDirectory() as tmp:
        devices, note, state = _lenet_devices(Path(tmp))
        out["sandbox_note"] = note
        try:
            for device in devices:
                out["devices"][device.name] = _lenet_on(device, arts, cpu)
        finally:
            if state is not None:
                from deepfleet.sandbox import down

                down(state)
    out["loadavg_at_start"], out["loadavg_at_end"] = load_start, _loadavg()
    return out


def _lenet_on(device: Device, arts: dict[str, Path], cpu: int) -> dict[str, Any]:
    result: dict[str, Any] = {"simulated": device.simulated,
                              "energy_simulated": device.energy.simulated}
    # The Edison stand-in runs reference BLAS on 0.15 CPU: one batch-64 run of the original
    # takes seconds, so warm-up is short there and the reply deadline generous (the agent's
    # warm-up is bounded by a count, not by time).
    with DeviceSession(device, deadline_margin_s=300) as session:
        result["machine"] = session.connect().get("machine")
        for batch in (1, 64):
            rows: dict[str, list[dict[str, Any]]] = {"compressed": [], "original": []}
            request = {**PINNED, "cpus": [cpu], "batch": batch}
            if batch > 1 and device.device_class == "edison":
                request["warmup"] = 2
            # Two rounds, alternating, so a device that drifts does not favour one model.
            for name in ("original", "compressed", "compressed", "original"):
                try:
                    r = session.measure(arts[name], request)
                except DeviceError as exc:
                    rows[name].append({"error": str(exc)})
                    continue
                e = r["energy"]
                rows[name].append({"p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"],
                                   "p99_ms": r["p99_ms"], "ci_rel_width": r["ci_rel_width"],
                                   "runs": r["runs"], "stop_reason": r["stop_reason"],
                                   "energy_mj": e["energy_per_inference_mj"],
                                   "energy_kind": e["kind"]})
            good = {k: [x["p50_ms"] for x in v if "p50_ms" in x] for k, v in rows.items()}
            p50 = {k: statistics.mean(v) if v else None for k, v in good.items()}
            ratio = (p50["compressed"] / p50["original"]
                     if p50["compressed"] and p50["original"] else None)
            result[f"batch{batch}"] = {
                "p50_ms": {k: round(v, 5) if v else None for k, v in p50.items()},
                "ratio_compressed_over_original": round(ratio, 4) if ratio else None,
                "measurements": rows,
            }
    return result
