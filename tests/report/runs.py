"""Synthetic run directories written with the REAL writers, for the report tests and benchmark.

:func:`make_run` simulates a search of a LeNet5-like model on a fleet: each trial keeps a
fraction of the units, which sets its accuracy, size and cost; each device of a class runs it at
the class's speed times its own unit factor. The numbers are synthetic; everything else is real:
agent-shaped ``measure`` responses (latency fields from the agent's own ``latency_summary``) go
through ``results.measurement_row`` / ``failure_row`` and ``results.write_results``; candidate
rows through ``candidates.candidate_row`` / ``write_candidates``; a few artifacts through
``artifact.write_artifact``, so hashes, manifests and Parquet files are what a run writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepfleet.artifact import write_artifact
from deepfleet.candidate import Candidate, Layer
from deepfleet.device_agent.agent import AGENT_VERSION, latency_summary
from deepfleet.device_agent.protocol import ESTIMATE_BASIS
from deepfleet.orchestrator.candidates import candidate_row, write_candidates
from deepfleet.orchestrator.results import (
    RESULTS_SCHEMA,
    failure_row,
    measurement_row,
    write_results,
)

T0 = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.timezone.utc)
# LeNet5 as in DeepIoT's Table 1: units per prunable layer, parameters, Edison time and energy
LAYERS = [("conv1", "conv", 20), ("conv2", "conv", 50), ("fc1", "linear", 500), ("fc2", "linear", 10)]
BASE_PARAMS, BASE_MACS, BASE_BYTES = 431_080, 2_293_000, 1_724_320


@dataclass(frozen=True)
class ClassSpec:
    """A device class: its devices, its speed (baseline p50 in ms), and its energy kind."""

    devices: int
    base_ms: float
    energy: str  # measured | simulated | estimated
    arch: str = "x86_64"
    power_w: float = 1.0
    backend: str = "numpy"  # the runtime its devices measure in
    stated_power: bool = False  # the fleet file states its power: a time-based energy estimate


DEFAULT_CLASSES = {
    "edison": ClassSpec(devices=3, base_ms=50.2, energy="simulated", arch="i686", power_w=0.95),
    "pi4": ClassSpec(devices=4, base_ms=12.0, energy="estimated", arch="aarch64", power_w=3.2,
                     backend="onnxruntime", stated_power=True),
    "x86": ClassSpec(devices=2, base_ms=1.5, energy="measured", power_w=15.0, backend="onnxruntime"),
}


@dataclass
class RunInfo:
    """What :func:`make_run` wrote (for assertions)."""

    root: Path
    study: str
    rows: int = 0
    baseline_hash: str = ""
    reference_hash: str = ""
    trials: dict[int, dict[str, Any]] = field(default_factory=dict)  # trial -> its truth


def _hash(rng: np.random.Generator) -> str:
    return rng.bytes(32).hex()


def _layers(keep: float) -> list[Layer]:
    """Rows shaped like ``compressors.layer_table``'s (parameters: a rough share per unit)."""
    out = []
    for i, (name, kind, units) in enumerate(LAYERS):
        after = units if i == len(LAYERS) - 1 else max(1, round(units * keep ** (0.5 + 0.2 * i)))
        per_unit = BASE_PARAMS // (4 * units)
        out.append(Layer(name=name, kind=kind, units_before=units, units_after=after,
                         params_before=per_unit * units, params_after=per_unit * after,
                         pruned=i < len(LAYERS) - 1, nonzero_after=per_unit * after, bits_per_weight=32.0))
    return out


def agent_response(rng: np.random.Generator, *, artifact_hash: str, p50_ms: float, runs: int,
                   spec: ClassSpec, params: int, macs: int, started: dt.datetime,
                   model: str = "lenet5", compressor: str = "deepiot") -> dict[str, Any]:
    """A successful ``measure`` response shaped like the agent's (same field names and types)."""
    lat_ms = p50_ms * rng.lognormal(0.0, 0.06, runs) + rng.exponential(0.02 * p50_ms, runs)
    estimate = (macs * (3.7 + 0.9) + params * 640.0) * 1e-9  # the agent's formula, in mJ
    energy: dict[str, Any] = {
        "source": None, "kind": "estimated", "simulated": False, "simulated_note": None,
        "energy_per_inference_mj": None, "samples": 0, "sample_hz_achieved": None,
        "idle_power_w": None, "active_power_w": None,
        "estimated_energy_per_inference_mj": estimate, "estimate_basis": ESTIMATE_BASIS,
        "time_estimated_energy_per_inference_mj": None, "stated_power_w": None,
    }
    if spec.stated_power:
        energy.update({"time_estimated_energy_per_inference_mj": spec.power_w * float(np.median(lat_ms)),
                       "stated_power_w": spec.power_w})
    if spec.energy != "estimated":
        duration = float(lat_ms.sum()) / 1e3
        energy.update({
            "source": "rapl" if spec.energy == "measured" else "hwmon", "kind": spec.energy,
            "simulated": spec.energy == "simulated",
            "simulated_note": "deepfleet_sim power model" if spec.energy == "simulated" else None,
            "energy_per_inference_mj": spec.power_w * float(np.median(lat_ms)) * rng.normal(1, 0.03),
            "samples": max(2, int(duration * 10)), "sample_hz_achieved": 9.8 + rng.random() * 0.3,
            "idle_power_w": 0.3 * spec.power_w, "active_power_w": 1.3 * spec.power_w,
        })
    temp = 45.0 + 10 * rng.random()
    resp: dict[str, Any] = {
        "ok": True, "op": "measure", "agent_version": AGENT_VERSION, "protocol": 1,
        "machine": spec.arch, "python": "3.11.2", "numpy": "1.24.2",
        "artifact_hash": artifact_hash, "backend": spec.backend, "batch": 1, "model": model,
        "backend_version": "1.24.2" if spec.backend == "numpy" else "1.32.0",
        "provider": "cpu (BLAS: openblas)" if spec.backend == "numpy" else "CPUExecutionProvider",
        "init_ms": 0.02 * params ** 0.5 * spec.base_ms, "first_run_ms": 1.5 * p50_ms,
        "memory_peak_mb": 4 * params / 2**20 + 0.1, "cpu_p50_ms": 0.98 * float(np.median(lat_ms)),
        "compressor": compressor, "params": params, "macs": macs, "threads_requested": 1,
        "threads": 1, "affinity": [0], "warmup": 5, "stop_reason": "ci",
        "governor_before": "performance", "freq_before_mhz": 500.0, "freq_after_mhz": 500.0,
        "temp_before_c": temp, "temp_after_c": temp + 2 * rng.random(),
        "loadavg_before": [0.1, 0.1, 0.05], "energy": energy,
        "started_at": started.isoformat(),
        "ended_at": (started + dt.timedelta(seconds=float(lat_ms.sum()) / 1e3)).isoformat(),
    }
    resp.update(latency_summary((lat_ms * 1e6).tolist(), 0.95, 0.02))
    return resp


def measurement_rows(study: str, n: int = 3, **override: Any) -> list[dict[str, Any]]:
    """``n`` real measurement rows of one artifact on device pi4-1, fields overridable (e.g.
    ``schema_version`` to fake rows of another version)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        resp = agent_response(rng, artifact_hash="ab" * 32, p50_ms=10.0, runs=20,
                              spec=DEFAULT_CLASSES["pi4"], params=1000, macs=10_000,
                              started=T0 + dt.timedelta(seconds=i))
        rows.append(measurement_row(resp, study=study, device="pi4-1", device_class="pi4") | override)
    return rows


def write_v1_results(root: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` (of one study and device) as a file of results schema version 1 wrote it: no
    ``drift`` column, ``schema_version`` 1, partition columns in the folder names only."""
    schema = RESULTS_SCHEMA.remove(RESULTS_SCHEMA.get_field_index("drift"))
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "drift"}
                                  | {"schema_version": 1} for r in rows], schema=schema)
    folder = (root / f"study={quote(rows[0]['study'], safe='')}"
              / f"device={quote(rows[0]['device'], safe='')}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"part-v1-{rows[0]['measurement_id']}.parquet"
    pq.write_table(table.drop_columns(["study", "device"]), path)
    return path


def make_run(root: Path, *, study: str = "lenet5-digits", trials: int = 24, repeats: int = 1,
             runs: int = 30, classes: dict[str, ClassSpec] | None = None,
             candidates: bool = True, reference_every: int = 10, failures: int = 2,
             seed: int = 0, batch_rows: int = 20_000, drop_limit: float | None = None) -> RunInfo:
    """Write ``root/results`` (and ``root/candidates``, ``root/artifacts`` with ``candidates``).

    ``drop_limit`` adds the study constraint ``accuracy_drop_pp<=drop_limit`` to every trial's
    constraints (as the search labels it): a trial over it breaks a constraint.

    Every feasible trial is measured ``repeats`` times on every device (``runs`` latencies per
    row); every ``reference_every``-th measurement of a device is followed by a drift check of a
    fixed reference artifact; ``failures`` failed rows are added. Trials 0-1 are predicted
    infeasible / failed (no rows), trial 2 breaks a bytes constraint (measured, infeasible).
    """
    rng = np.random.default_rng(seed)
    classes = classes or DEFAULT_CLASSES
    info = RunInfo(root=root, study=study)
    arts = root / "artifacts"
    base = write_artifact(arts, {"format": "deepfleet-graph", "version": 1, "ops": []},
                          {"w": np.zeros(4, np.float32)},
                          {"model": "lenet5", "data": "digits", "params": BASE_PARAMS,
                           "macs": BASE_MACS, "compressor": {"method": "none"},
                           "val_accuracy": 0.985}, onnx=False)  # an empty graph: nothing runs
    info.baseline_hash = base.digest
    info.reference_hash = _hash(rng)
    # (trial, hash, keep fraction, val accuracy); trial None: the baseline
    plan: list[tuple[int | None, str, float, float]] = [(None, base.digest, 1.0, 0.985)]
    cand_rows = [candidate_row(
        study=study, kind="baseline", outcome="baseline", created_at=T0, candidate=Candidate(
            model="lenet5", data="digits", method="none", artifact_hash=base.digest, accuracy_val=0.985,
            accuracy_test=0.981, accuracy_drop_pp=0.0, params=BASE_PARAMS, macs=BASE_MACS, bytes=BASE_BYTES,
            kept_params=1.0, layers=tuple(_layers(1.0))))]
    for t in range(trials):
        keep = float(np.exp(rng.uniform(np.log(0.01), np.log(0.6))))
        if t == 2:
            keep = max(keep, 0.3)  # too big for the bytes constraint: measured, infeasible
        acc = 0.985 - 0.0002 / (keep + 0.02) - abs(rng.normal(0, 0.002))
        h = _hash(rng)
        outcome = {0: "predicted_infeasible", 1: "failed", 2: "infeasible"}.get(t, "measured")
        constraints = [{"label": "bytes<=400000", "metric": "bytes", "device_class": None, "max": 400_000.0,
                        "excess": int(BASE_BYTES * keep) - 400_000}]
        if drop_limit is not None:
            constraints.append({"label": f"accuracy_drop_pp<={drop_limit:g}", "metric": "accuracy_drop_pp",
                                "device_class": None, "max": drop_limit,
                                "excess": 100 * (0.985 - acc) - drop_limit})
        info.trials[t] = {"hash": h, "keep": keep, "accuracy_val": acc, "outcome": outcome}
        objectives = [{"metric": "accuracy", "device_class": None, "value": acc}]
        for cls, spec in classes.items():
            objectives.append({"metric": "latency_p50", "device_class": cls,
                               "value": spec.base_ms * (0.08 + 0.92 * keep)})
        cand = Candidate(model="lenet5", data="digits", method="deepiot", artifact_hash=h, accuracy_val=acc,
                         accuracy_test=acc - 0.003, accuracy_drop_pp=100 * (0.985 - acc),
                         params=int(BASE_PARAMS * keep), macs=int(BASE_MACS * keep),
                         bytes=int(BASE_BYTES * keep), kept_params=keep, layers=tuple(_layers(keep)))
        cand_rows.append(candidate_row(
            study=study, kind="candidate", trial=t, outcome=outcome, candidate=cand,
            trial_params={"deepiot.tau_max": 0.5 + keep}, objectives=objectives,
            constraints=constraints, values_source="measured" if t > 1 else "predicted",
            fail_reason="worker died" if t == 1 else None,
            created_at=T0 + dt.timedelta(minutes=t)))
        if outcome in ("measured", "infeasible"):
            plan.append((t, h, keep, acc))
    if candidates:
        write_candidates(root / "candidates", cand_rows)
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        write_results(root / "results", rows)
        info.rows += len(rows)
        rows.clear()

    clock = T0
    for cls, spec in classes.items():
        for d in range(spec.devices):
            device = f"{cls}-{d + 1}"
            unit = 1.0 + 0.04 * (d - (spec.devices - 1) / 2)  # units differ by a few %
            n = 0
            for _ in range(repeats):
                for trial, h, keep, _acc in plan:
                    clock += dt.timedelta(seconds=2)
                    p50 = spec.base_ms * (0.08 + 0.92 * keep) * unit
                    resp = agent_response(rng, artifact_hash=h, p50_ms=p50, runs=runs, spec=spec,
                                          params=int(BASE_PARAMS * keep), macs=int(BASE_MACS * keep),
                                          started=clock,
                                          compressor="none" if trial is None else "deepiot")
                    rows.append(measurement_row(
                        resp, study=study, device=device, device_class=cls, trial=trial,
                        simulated="simulated power sensor" if spec.energy == "simulated" else None,
                        artifact_bytes=int(BASE_BYTES * keep)))
                    n += 1
                    if reference_every and n % reference_every == 0:
                        drift = 1.0 + 0.002 * n / reference_every  # the unit warms up slowly
                        ref = agent_response(rng, artifact_hash=info.reference_hash,
                                             p50_ms=spec.base_ms * 0.5 * unit * drift, runs=runs,
                                             spec=spec, params=1000, macs=50_000, started=clock,
                                             model="reference", compressor="none")
                        rows.append(measurement_row(ref, study=study, device=device,
                                                    device_class=cls, reference=True))
                    if len(rows) >= batch_rows:
                        flush()
    for i in range(failures):
        cls = list(classes)[i % len(classes)]
        rows.append(failure_row(study=study, device=f"{cls}-1", device_class=cls,
                                artifact_hash=plan[-1][1], trial=plan[-1][0],
                                error="device unreachable: ssh connect timed out after 10 s",
                                started_at=clock, arch=classes[cls].arch))
    flush()
    return info
