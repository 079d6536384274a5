"""The one definition of every metric: row, device and class values, energy kept by kind."""

from __future__ import annotations

import pytest

from deepfleet import metrics
from deepfleet.candidate import Candidate


def row(device: str, cls: str = "a", p50: float = 1.0, *, energy: float | None = None, kind: str | None = None,
        estimate: float = 0.3, artifact: str = "x", **extra: object) -> dict:
    return {"device": device, "device_class": cls, "artifact_hash": artifact, "p50_ms": p50, "p90_ms": 1.2 * p50,
            "energy_per_inference_mj": energy, "energy_kind": kind, "estimated_energy_mj": estimate,
            "error": None, "reference": False, **extra}


def test_class_value_is_the_median_over_devices_of_each_devices_median() -> None:
    rows = [row("d1", p50=1.0), row("d1", p50=100.0), row("d1", p50=2.0),  # d1's value: 2.0
            row("d2", p50=3.0), row("d3", p50=10.0),
            row("d3", p50=99.0, error="link cut"), row("d2", p50=50.0, reference=True),
            row("d4", cls="b", p50=7.0)]
    assert metrics.device_values("latency_p50", [r for r in rows if r["device_class"] == "a"]) == {
        ("d1", "unknown"): 2.0, ("d2", "unknown"): 3.0, ("d3", "unknown"): 10.0}
    assert metrics.class_value("latency_p50", rows, "a") == 3.0
    assert metrics.class_value("latency_p50", rows, "b") == 7.0
    assert metrics.class_value("latency_p50", rows, "c") is None


def test_energy_kinds_never_stand_in_for_each_other() -> None:
    """Three devices of one class: a real meter (10), a simulated sensor (50), none (the
    op-count estimate 0.3 on every row). Each energy metric reads its own kind only."""
    rows = [row("d1", energy=10.0, kind="measured"), row("d2", energy=50.0, kind="simulated"), row("d3")]
    assert metrics.class_value("energy", rows, "a") == 10.0
    assert metrics.class_value("energy_simulated", rows, "a") == 50.0
    assert metrics.class_value("energy_estimated", rows, "a") == 0.3
    assert metrics.row_value("energy", rows[2]) is None  # no sensor: no measured energy
    assert metrics.row_value("energy", rows[1]) is None  # a model of a sensor is not a meter


def test_candidate_metrics_read_the_candidates_fields() -> None:
    c = Candidate(model="mlp", data="digits", method="deepiot", artifact_hash="x", accuracy_val=0.97,
                  accuracy_test=0.96, accuracy_drop_pp=0.8, params=1000, macs=900, bytes=5000, kept_params=0.05)
    assert metrics.candidate_value("accuracy", c) == 0.97
    assert metrics.candidate_value("accuracy_drop_pp", c) == 0.8
    assert metrics.candidate_value("bytes", c) == 5000
    with pytest.raises(ValueError, match="measured on devices"):
        metrics.candidate_value("latency_p50", c)


def test_device_table_has_every_device_metric_per_device() -> None:
    rows = [row("d1", energy=10.0, kind="measured"), row("d1", p50=3.0, energy=12.0, kind="measured"),
            row("d2", artifact="y")]
    table = metrics.device_table(rows)
    assert [(r["artifact_hash"], r["device"], r["rows"]) for r in table] == [("x", "d1", 2), ("y", "d2", 1)]
    assert table[0]["latency_p50"] == 2.0 and table[0]["energy"] == 11.0 and table[1]["energy"] is None


def test_device_metrics_read_columns_the_results_dataset_has() -> None:
    from deepfleet.orchestrator.results import RESULTS_SCHEMA

    columns = set(RESULTS_SCHEMA.names)
    assert {m.field for m in metrics.METRICS.values() if m.per_device} <= columns
    assert {m.plus for m in metrics.METRICS.values() if m.plus} <= columns
    assert {m.field for m in metrics.METRICS.values() if not m.per_device} <= set(Candidate.__dataclass_fields__)


def test_runtimes_are_never_pooled() -> None:
    """d1 ran onnxruntime, d2 numpy (no onnxruntime there): each keeps its own device value,
    and the class has no value, with a reason that names the devices and the fix."""
    rows = [row("d1", p50=1.0, backend="onnxruntime"), row("d1", p50=3.0, backend="onnxruntime"),
            row("d2", p50=10.0, backend="numpy")]
    assert metrics.device_values("latency_p50", rows) == {("d1", "onnxruntime"): 2.0, ("d2", "numpy"): 10.0}
    assert metrics.class_value("latency_p50", rows, "a") is None
    assert metrics.class_backend(rows, "a") is None
    reason = metrics.backend_conflict(rows, "a", "x")
    assert reason is not None and "class 'a'" in reason
    assert "numpy on d2" in reason and "onnxruntime on d1" in reason and "install onnxruntime" in reason
    # one runtime on every device: a class value, and no conflict
    same = [r | {"backend": "onnxruntime"} for r in rows]
    assert metrics.class_value("latency_p50", same, "a") == 6.0 and metrics.class_backend(same, "a") == "onnxruntime"
    assert metrics.backend_conflict(same, "a") is None
    # a device measured with each runtime has two device values, not one pooled figure
    both = [*same, row("d1", p50=50.0, backend="numpy")]
    assert metrics.device_values("latency_p50", [r for r in both if r["device"] == "d1"]) == {
        ("d1", "onnxruntime"): 2.0, ("d1", "numpy"): 50.0}
    assert metrics.class_value("latency_p50", both, "a") is None
    table = metrics.device_table(both)
    assert [(r["device"], r["backend"], r["latency_p50"]) for r in table] == [
        ("d1", "numpy", 50.0), ("d1", "onnxruntime", 2.0), ("d2", "onnxruntime", 10.0)]
    # failed and reference rows do not count as having run anything
    assert metrics.backend_conflict([*same, row("d2", backend="numpy", error="cut"),
                                     row("d1", backend="numpy", reference=True)], "a") is None


def test_load_memory_and_cpu_metrics_read_their_columns() -> None:
    rows = [row("d1", init_ms=12.0, memory_peak_mb=5.5, cpu_p50_ms=0.8, backend="onnxruntime"),
            row("d2", init_ms=20.0, memory_peak_mb=4.5, cpu_p50_ms=1.2, backend="onnxruntime"),
            row("d3", init_ms=None, memory_peak_mb=None, cpu_p50_ms=1.0, backend="onnxruntime")]  # cached model
    assert metrics.class_value("init_ms", rows, "a") == 16.0
    assert metrics.class_value("memory_peak_mb", rows, "a") == 5.0
    assert metrics.class_value("cpu_p50", rows, "a") == 1.0
    assert metrics.metric("memory_peak_mb").unit == "MiB" and metrics.metric("init_ms").direction == "minimize"


def test_the_time_based_energy_estimate_is_its_own_kind() -> None:
    rows = [row("d1", estimate=0.011, time_estimated_energy_mj=0.51), row("d2", estimate=0.02)]
    assert metrics.class_value("energy_time_estimated", rows, "a") == 0.51  # d2 states no power
    assert metrics.class_value("energy_estimated", rows, "a") == pytest.approx(0.0155)
    assert metrics.row_value("energy", rows[0]) is None  # neither estimate is a measurement
    assert metrics.metric("energy_time_estimated").energy_kind == "time_estimated" in metrics.ENERGY_KINDS


def test_sensing_energy_is_an_estimate_and_the_total_sums_two_estimates_only() -> None:
    rows = [row("d1", energy=10.0, kind="measured", sensing_energy_mj=7.9),
            row("d2", estimate=0.5, sensing_energy_mj=0.25), row("d3")]  # d3: no sensor power known
    assert metrics.METRICS["energy_sensing"].energy_kind == "estimated"
    assert metrics.METRICS["energy_total"].energy_kind == "estimated"
    assert metrics.row_value("energy_sensing", rows[0]) == 7.9
    assert metrics.row_value("energy_total", rows[0]) == pytest.approx(0.3 + 7.9)  # not 10 + 7.9
    assert metrics.row_value("energy_total", rows[2]) is None  # one part missing: no total
    assert metrics.device_values("energy_total", rows) == {("d1", "unknown"): pytest.approx(8.2),
                                                         ("d2", "unknown"): 0.75}
    assert metrics.class_value("energy_sensing", rows, "a") == pytest.approx((7.9 + 0.25) / 2)
    assert {"energy_sensing", "energy_total"} <= {m for m, _ in metrics.class_values(rows, "x")}
