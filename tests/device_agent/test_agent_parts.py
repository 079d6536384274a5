"""The agent's pure parts, in process: median CI, sensor readers on fake sysfs trees, estimates.

The energy sources' shared contract is in ``test_energy_contract.py``; these are the details."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import deepfleet.device_agent.agent as A
from deepfleet.device_agent import energy as E
from deepfleet.device_agent import protocol as P


def _files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


# ---------------------------------------------------------------------------- median CI


def test_median_ci_uses_the_textbook_order_statistics() -> None:
    values = list(range(1, 21))  # n = 20: the 95 % interval is [x_(6), x_(15)]
    low, high, coverage = A.median_ci(values, 0.95)
    assert (low, high) == (6, 15)
    assert coverage == pytest.approx(1 - 2 * sum(math.comb(20, k) for k in range(6)) / 2**20)
    assert coverage >= 0.95


def test_median_ci_needs_six_values_at_95_percent() -> None:
    assert A.median_ci([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) is None
    assert A.median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 0.95)[:2] == (1.0, 6.0)


@pytest.mark.parametrize("n", [A.EXACT_CI_LIMIT + 1, 20_000])
def test_normal_approximation_matches_the_exact_rank(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    approx_rank, approx_cov = A._median_rank(n, 0.95)
    monkeypatch.setattr(A, "EXACT_CI_LIMIT", 10**9)
    exact_rank, exact_cov = A._median_rank(n, 0.95)
    assert abs(approx_rank - exact_rank) <= 1
    assert approx_cov == pytest.approx(exact_cov, abs=2e-3)


def test_median_ci_covers_the_median_of_a_skewed_distribution() -> None:
    # Distribution-free: lognormal latencies (median exactly 1) are covered >= 95 % of the time.
    rng = np.random.default_rng(0)
    trials, n = 4000, 31
    samples = np.sort(rng.lognormal(0.0, 1.0, size=(trials, n)), axis=1)
    rank, coverage = A._median_rank(n, 0.95)
    hits = (samples[:, rank - 1] <= 1.0) & (1.0 <= samples[:, n - rank])
    assert coverage >= 0.95
    assert hits.mean() == pytest.approx(coverage, abs=0.015)


def test_latency_summary_handles_a_single_run() -> None:
    s = A.latency_summary([1_000_000], 0.95, 0.02)
    assert s["runs"] == 1 and s["p50_ms"] == 1.0 and s["std_ms"] is None
    assert s["p50_ci_low_ms"] is None and s["ci_met"] is False


# ---------------------------------------------------------------------------- sensors


def test_rapl_sums_top_level_zones_and_handles_a_wrap(tmp_path: Path) -> None:
    root = _files(tmp_path, {
        "intel-rapl:0/name": "package-0", "intel-rapl:0/energy_uj": "900000",
        "intel-rapl:0/max_energy_range_uj": "1000000",
        "intel-rapl:0:0/name": "core", "intel-rapl:0:0/energy_uj": "5",  # inside package-0
        "intel-rapl:1/name": "package-1", "intel-rapl:1/energy_uj": "0",
        "intel-rapl:1/max_energy_range_uj": "1000000",
    })
    src = E.find_rapl(str(root))
    assert src.kind == "energy" and src.sensor == "package-0+package-1"
    first = src.read()
    (root / "intel-rapl:0/energy_uj").write_text("100000\n")  # wrapped: +200000 µJ
    (root / "intel-rapl:1/energy_uj").write_text("300000\n")  # +300000 µJ
    assert src.read() - first == pytest.approx(0.5)


def test_hwmon_prefers_power_and_falls_back_to_current_times_voltage(tmp_path: Path) -> None:
    ina = _files(tmp_path / "hwmon3", {"name": "ina3221", "curr1_input": "500", "in1_input": "5000",
                                       "curr2_input": "100", "in2_input": "3300"})
    src = E.find_hwmon(str(tmp_path))
    assert src.read() == pytest.approx(2.5) and src.sim_hint is None  # 500 mA x 5 V
    assert E.HwmonSource(str(ina), "curr2").read() == pytest.approx(0.33)
    _files(ina, {"power1_input": "1250000"})
    assert E.HwmonSource(str(ina)).read() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="power4"):
        E.HwmonSource(str(ina), "power4")


def test_hwmon_without_power_channels_is_skipped(tmp_path: Path) -> None:
    _files(tmp_path / "hwmon0", {"name": "coretemp", "temp1_input": "40000"})
    with pytest.raises(ValueError, match="no usable hwmon"):
        E.find_hwmon(str(tmp_path))


def test_power_supply_current_times_voltage_ignores_the_sign(tmp_path: Path) -> None:
    _files(tmp_path / "BAT0", {"current_now": "-1000000", "voltage_now": "4000000",
                               "status": "Discharging"})
    src = E.find_power_supply(str(tmp_path))
    assert src.read() == pytest.approx(4.0) and src.describe()["status"] == "Discharging"


def test_auto_finds_nothing_in_an_empty_tree_and_says_why(tmp_path: Path) -> None:
    spec = P.parse_energy({"path": str(tmp_path)})
    source, note = E.open_energy_source(spec)
    assert source is None and "rapl" in note and "hwmon" in note and "power_supply" in note


def test_energy_settings_are_validated() -> None:
    with pytest.raises(P.AgentError, match="sample_hz"):
        P.parse_energy({"sample_hz": 0})
    with pytest.raises(P.AgentError, match="'souce'"):
        P.parse_energy({"souce": "hwmon"})
    with pytest.raises(P.AgentError, match="needs energy.'command'"):
        P.parse_energy({"source": "command"})


def test_integrate_trapezoids_and_window_clipping() -> None:
    samples = [(0.0, 1.0), (1.0, 3.0), (2.0, 3.0)]
    assert E.integrate(samples, "power") == (pytest.approx(5.0), 2.0)
    joules, span = E.integrate(samples, "power", 0.5, 1.5)  # 2 W at 0.5 s, 3 W from 1 s
    assert span == 1.0 and joules == pytest.approx(0.5 * (2 + 3) / 2 + 0.5 * 3)
    assert E.integrate([(0.0, 10.0), (2.0, 16.0)], "energy") == (6.0, 2.0)
    assert E.integrate([(0.0, 1.0)], "power") == (None, 0.0)


def test_estimate_follows_the_energy_table() -> None:
    got = E.estimate_energy_mj({"macs": 1000, "params": 10}, 3)
    assert got == pytest.approx((3 * 1000 * (3.7 + 0.9) + 10 * 640) * 1e-9)
    assert E.estimate_energy_mj({"params": 10}, 1) is None
