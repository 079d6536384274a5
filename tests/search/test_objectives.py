from __future__ import annotations

import numpy as np

from deepfleet.search._objectives import (
    broken_before_measurement,
    class_metrics,
    constraint_values,
    objective_values,
)
from deepfleet.search._predictor import clearly_breaks, fit, training_points
from deepfleet.search._spec import parse_study

SPEC = parse_study({
    "name": "s", "model": "m", "data": "d", "classes": ["a", "b"],
    "objectives": ["accuracy", {"metric": "latency_p50", "class": "a"}, {"metric": "energy", "class": "b"}],
    "constraints": [{"metric": "accuracy_drop_pp", "max": 0.5}, {"metric": "latency_p50", "class": "b", "max": 10}],
})


def _row(device: str, cls: str, p50: float, energy=None, estimate=None, error=None) -> dict:
    return {"device": device, "device_class": cls, "p50_ms": p50, "p90_ms": p50 * 1.2,
            "energy_per_inference_mj": energy, "estimated_energy_mj": estimate, "error": error}


def test_class_metrics_take_the_median_over_devices_and_skip_failures() -> None:
    rows = [_row("a1", "a", 1.0), _row("a2", "a", 3.0), _row("a3", "a", 10.0),
            _row("a3", "a", 99.0, error="link cut"), _row("b1", "b", 8.0, estimate=2.5)]
    m = class_metrics(rows)
    assert m[("latency_p50", "a")] == 3.0
    assert m[("energy", "b")] == 2.5  # no sensor: the labelled estimate stands in
    assert m[("latency_p50", "b")] == 8.0


def test_objectives_and_constraints() -> None:
    cand = {"accuracy": 0.97, "accuracy_drop_pp": 0.8}
    per_class = {("latency_p50", "a"): 2.0, ("energy", "b"): 1.5, ("latency_p50", "b"): 12.0}
    assert objective_values(SPEC, cand, per_class) == [0.97, 2.0, 1.5]
    assert constraint_values(SPEC, cand, per_class) == {
        "accuracy_drop_pp<=0.5": 0.8 - 0.5, "latency_p50@b<=10": 2.0}
    # before any measurement only the accuracy constraint can be judged, and it is broken
    assert list(broken_before_measurement(SPEC, cand)) == ["accuracy_drop_pp<=0.5"]
    assert broken_before_measurement(SPEC, {"accuracy_drop_pp": 0.1}) == {}


def test_predictor_recovers_a_linear_cost_and_judges_by_margin() -> None:
    rng = np.random.default_rng(0)
    pts = [{"macs": m, "params": p, "p50_ms": 0.5 + 2e-6 * m + 1e-6 * p}
           for m, p in zip(rng.uniform(1e4, 1e6, 12), rng.uniform(1e3, 1e5, 12))]
    f = fit(pts, "p50_ms")
    assert f is not None and f.loo_error < 0.01
    assert abs(f.predict({"macs": 5e5, "params": 5e4}) - (0.5 + 1.0 + 0.05)) < 0.01
    assert clearly_breaks(f, {"macs": 5e6, "params": 1e4}, limit=5.0)[0]  # predicts ~10.5 ms
    assert not clearly_breaks(f, {"macs": 2.2e6, "params": 1e4}, limit=4.0)[0]  # 4.91 ms: within margin
    assert fit(pts[:3], "p50_ms") is None  # too few points to trust


def test_training_points_group_rows_by_artifact() -> None:
    rows = [{"artifact_hash": "x", "device_class": "a", "macs": 10, "params": 5, "p50_ms": v} for v in (1.0, 3.0, 2.0)]
    rows.append({"artifact_hash": "x", "device_class": "b", "macs": 10, "params": 5, "p50_ms": 9.0})
    assert training_points(rows, "a", "p50_ms") == [{"macs": 10, "params": 5, "p50_ms": 2.0}]


def test_device_metrics_read_columns_the_results_dataset_has() -> None:
    # the search reads measurement rows as the results module writes them
    from deepfleet.orchestrator.results import RESULTS_SCHEMA
    from deepfleet.search._objectives import ROW_FIELD

    columns = set(RESULTS_SCHEMA.names)
    assert set(ROW_FIELD.values()) | {"estimated_energy_mj"} <= columns
