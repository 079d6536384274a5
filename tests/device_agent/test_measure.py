"""``measure`` on a real agent subprocess: latency distribution, stopping rule, energy, thermal."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepfleet.artifact import Artifact
from deepfleet.device_agent.agent import AGENT_VERSION, latency_summary, timed_runs
from deepfleet.device_agent.protocol import ADD_PJ, DRAM_PJ_PER_32BIT, MULT_PJ
from tests.conftest import AgentProcess

NO_ENERGY = {"source": "none"}


@pytest.fixture
def agent(shared_agent: AgentProcess) -> AgentProcess:
    """Every test here leaves the agent serving: share one (and check it still answers)."""
    assert shared_agent.request({"op": "ping"})["ok"]
    return shared_agent


def _measure(agent: AgentProcess, art: Artifact, **fields: Any) -> dict[str, Any]:
    # max_runs lifted: on a fast machine the tiny model reaches the default 10,000 runs before
    # a test's min_seconds, and the stop reason would depend on the machine
    req = {"op": "measure", "artifact": str(art.path), "warmup": 2, "energy": NO_ENERGY,
           "max_runs": 10**9, **fields}
    r = agent.request(req, timeout=120)
    assert r["ok"], r
    return r


def test_measure_reports_an_ordered_distribution_with_provenance(agent: AgentProcess,
                                                                 tiny_artifact: Artifact) -> None:
    r = _measure(agent, tiny_artifact, min_runs=30, min_seconds=0.2, ci_target=None, id="m1")
    lat = np.asarray(r["latencies_ms"])
    assert r["id"] == "m1" and r["stop_reason"] == "minimum"
    assert r["runs"] == lat.size >= 30 and r["timed_s"] >= 0.2
    assert (lat > 0).all()
    assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["p50_ms"] == pytest.approx(np.percentile(lat, 50))
    assert r["mean_ms"] == pytest.approx(lat.mean()) and r["std_ms"] == pytest.approx(lat.std(ddof=1))
    assert r["p50_ci_low_ms"] <= r["p50_ms"] <= r["p50_ci_high_ms"]
    assert r["ci_coverage"] >= r["ci_level"] == 0.95
    # provenance
    assert r["artifact_hash"] == tiny_artifact.digest and r["agent_version"] == AGENT_VERSION
    assert r["model"] == "tiny" and r["params"] == tiny_artifact.manifest["params"]
    assert r["input_shape"] == [3, 16] and r["batch"] == 1
    # "auto" (the default) runs model.onnx where onnxruntime is installed, numpy elsewhere
    expected = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "numpy"
    assert r["backend"] == expected and r["backend_requested"] == "auto" and r["backend_version"]
    started, ended = (dt.datetime.fromisoformat(r[k]) for k in ("started_at", "ended_at"))
    assert started.tzinfo is not None and started < ended
    assert len(r["loadavg_before"]) == 3 and r["affinity"]
    assert r["timing_ms"]["timed"] == pytest.approx(r["timed_s"] * 1e3, rel=1e-3)
    assert r["energy"]["kind"] == "estimated" and r["energy"]["energy_per_inference_mj"] is None


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_in_effect_are_reported_not_assumed(agent: AgentProcess, tiny_artifact: Artifact,
                                                    threads: int) -> None:
    blas = agent.request({"op": "hello"})["blas"]
    r = _measure(agent, tiny_artifact, backend="numpy", threads=threads, min_runs=5, min_seconds=0,
                 ci_target=None)
    assert r["threads_requested"] == threads
    if blas["settable"]:
        assert r["threads"] == threads, r["threads_note"]
    elif r["threads"] != threads:  # e.g. 2 asked of a single-threaded reference BLAS
        assert "could not set" in r["threads_note"] and r["threads"] in (None, 1)


def test_ci_rule_stops_a_stable_model_long_before_its_bounds(agent: AgentProcess,
                                                            tiny_artifact: Artifact) -> None:
    r = _measure(agent, tiny_artifact, min_runs=20, min_seconds=0, max_runs=200_000,
                 max_seconds=20, ci_target=0.1)
    assert r["stop_reason"] == "ci" and r["ci_met"] is True
    assert 20 <= r["runs"] < 200_000 and r["timed_s"] < 20
    assert r["ci_rel_width"] <= 0.1
    width = (r["p50_ci_high_ms"] - r["p50_ci_low_ms"]) / r["p50_ms"]
    assert width == pytest.approx(r["ci_rel_width"])


def _jittered(seed: int) -> Callable[[Any], None]:
    """A run that busy-waits 5-50 us, drawn per call: a spread no median CI at the runs below
    narrows to 1e-9 of p50. (The tiny model's runs can: on a steady machine hundreds of runs
    around the median read the same 10 ns clock tick, a CI of width 0, which meets any target.)"""
    rng = np.random.default_rng(seed)

    def run(_x: Any) -> None:
        end = time.perf_counter_ns() + int(rng.integers(5_000, 50_000))
        while time.perf_counter_ns() < end:
            pass
    return run


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({"max_runs": 300, "max_seconds": 30}, "max_runs"), ({"max_runs": 10**9, "max_seconds": 0.3}, "max_seconds")],
)
def test_an_unmet_target_ends_at_the_run_bounds(fields: dict[str, Any], reason: str) -> None:
    spec = {"min_runs": 10, "min_seconds": 0, "ci_target": 1e-9, "ci_level": 0.95, **fields}
    t0 = time.perf_counter()
    lat, cpu, got = timed_runs(_jittered(0), None, spec)
    wall = time.perf_counter() - t0
    assert got == reason and len(lat) == len(cpu) >= spec["min_runs"]
    if reason == "max_runs":
        assert len(lat) == spec["max_runs"] and not latency_summary(lat, spec["ci_level"], spec["ci_target"])["ci_met"]
    else:
        assert spec["max_seconds"] <= wall < spec["max_seconds"] + 0.5


@pytest.mark.parametrize(
    "fields",
    [
        {"ci_target": 5.0, "min_runs": 400, "min_seconds": 0},
        # (max_runs lifted: a fast machine runs the tiny model 10,000 times in under 0.3 s)
        {"ci_target": 5.0, "min_runs": 10, "min_seconds": 0.3, "max_runs": 10**9},
    ],
)
def test_a_target_met_at_once_still_waits_for_the_minimums(agent: AgentProcess, tiny_artifact: Artifact,
                                                           fields: dict[str, Any]) -> None:
    r = _measure(agent, tiny_artifact, **fields)
    assert r["stop_reason"] == "ci"
    assert r["runs"] >= fields["min_runs"] and r["timed_s"] >= fields["min_seconds"]
    if fields["min_runs"] == 400:
        assert r["runs"] == 400  # met at the first check, which comes at the minimum


def _thread_affinities(pid: int) -> set[tuple[int, ...]]:
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    return {tuple(sorted(os.sched_getaffinity(t))) for t in tids}


def test_affinity_pin_applies_to_every_thread_and_is_restored(agent: AgentProcess,
                                                              tiny_artifact: Artifact) -> None:
    before = agent.request({"op": "hello"})["affinity"]
    if len(before) < 2:
        pytest.skip("needs two CPUs to see a pin")
    req = {"op": "measure", "artifact": str(tiny_artifact.path), "cpus": [before[0]], "threads": 2,
           "backend": "numpy",
           "min_runs": 5, "min_seconds": 0.6, "max_runs": 10**9,  # still running at 0.3 s
           "ci_target": None, "energy": NO_ENERGY}
    agent.send_raw((json.dumps(req) + "\n").encode())
    time.sleep(0.3)  # mid-run: the BLAS worker threads must be pinned too, not only the caller
    during = _thread_affinities(agent.pid)
    r = json.loads(agent.read_line())
    assert r["ok"] and r["affinity"] == [before[0]]
    assert during == {(before[0],)}
    assert agent.request({"op": "hello"})["affinity"] == before
    assert _thread_affinities(agent.pid) == {tuple(before)}
    bad = agent.request({"op": "measure", "artifact": str(tiny_artifact.path), "cpus": [4096]})
    assert bad["ok"] is False and bad["kind"] == "bad_request" and "4096" in bad["error"]


# ---------------------------------------------------------------------------- energy


def test_simulated_hwmon_gives_positive_energy_labelled_simulated(
    agent: AgentProcess, tiny_artifact: Artifact, start_powersim: Callable[..., Path]
) -> None:
    idle_w, active_w = 0.5, 2.0
    sim = start_powersim(pids=[agent.pid], idle_w=idle_w, active_w=active_w, hz=50, window_s=0.1)
    r = _measure(agent, tiny_artifact, threads=1, min_runs=10, min_seconds=1.0, ci_target=None,
                 max_runs=10**9, energy={"source": "hwmon", "path": str(sim), "sample_hz": 50,
                                         "idle_s": 0.4})
    e = r["energy"]
    assert e["source"] == "hwmon" and e["kind"] == "simulated" and e["simulated"] is True
    assert "deepfleet_sim" in e["simulated_note"]
    assert e["sensor"]["path"] == str(sim / "hwmon0")
    assert e["samples"] >= 20 and e["sample_hz_achieved"] > 10
    assert idle_w - 0.05 <= e["idle_power_w"] < idle_w + 0.5 * active_w  # the agent sat idle
    assert e["active_power_w"] > e["idle_power_w"]
    assert e["energy_per_inference_mj"] > 0
    # It cannot exceed the simulator's ceiling: active_w for every second of the window.
    assert e["energy_per_inference_mj"] <= 1.1 * active_w * e["window_s"] / r["runs"] * 1e3
    assert e["estimated_energy_per_inference_mj"] > 0  # the estimate is always there, labelled
    assert "estimate" in e["estimate_basis"]


def test_a_simulated_label_from_the_request_is_carried(agent: AgentProcess, tiny_artifact: Artifact,
                                                       start_powersim: Callable[..., Path]) -> None:
    sim = start_powersim(pids=[agent.pid])
    r = _measure(agent, tiny_artifact, min_runs=5, min_seconds=0.2, ci_target=None,
                 energy={"source": "hwmon", "path": str(sim / "hwmon0"), "idle_s": 0.1,
                         "simulated": "sandbox device: power from CPU time"})
    assert r["energy"]["kind"] == "simulated"
    assert r["energy"]["simulated_note"] == "sandbox device: power from CPU time"


def test_without_a_sensor_energy_is_null_with_a_labelled_estimate(agent: AgentProcess,
                                                                  tiny_artifact: Artifact,
                                                                  tmp_path: Path) -> None:
    empty = tmp_path / "no-sensors"
    empty.mkdir()
    r = _measure(agent, tiny_artifact, batch=2, min_runs=5, min_seconds=0,
                 energy={"source": "auto", "path": str(empty)})
    e = r["energy"]
    assert e["source"] is None and e["kind"] == "estimated" and e["energy_per_inference_mj"] is None
    assert "no energy sensor found" in e["note"]
    m = tiny_artifact.manifest
    expected = (2 * m["macs"] * (MULT_PJ + ADD_PJ) + m["params"] * DRAM_PJ_PER_32BIT) * 1e-9
    assert e["estimated_energy_per_inference_mj"] == pytest.approx(expected) and expected > 0
    assert "not a measurement" in e["estimate_basis"]


def test_a_named_sensor_that_is_absent_fails_before_measuring(agent: AgentProcess,
                                                             tiny_artifact: Artifact,
                                                             tmp_path: Path) -> None:
    r = agent.request({"op": "measure", "artifact": str(tiny_artifact.path),
                       "energy": {"source": "hwmon", "path": str(tmp_path)}})
    assert r["ok"] is False and r["kind"] == "energy_unavailable" and str(tmp_path) in r["error"]
    assert agent.request({"op": "ping"})["ok"]


@pytest.mark.parametrize(("command", "unit", "watts"), [
    (["echo", "3.0"], "W", 3.0),  # a meter printing watts
    (["date", "+%s.%N"], "J", 1.0),  # a counter rising one joule per second
])
def test_external_meter_command(agent: AgentProcess, tiny_artifact: Artifact,
                                command: list[str], unit: str, watts: float) -> None:
    r = _measure(agent, tiny_artifact, min_runs=5, min_seconds=0.4, ci_target=None,
                 energy={"source": "command", "command": command, "unit": unit, "sample_hz": 10,
                         "idle_s": 0.3})
    e = r["energy"]
    assert e["source"] == "command" and e["kind"] == "measured" and e["simulated"] is False
    assert e["idle_power_w"] == pytest.approx(watts, rel=0.05)
    assert e["active_power_w"] == pytest.approx(watts, rel=0.05)
    assert abs(e["energy_per_inference_mj"]) < 0.05 * watts * e["window_s"] / r["runs"] * 1e3


def test_idle_s_zero_reports_gross_energy_and_no_idle_power(agent: AgentProcess,
                                                           tiny_artifact: Artifact) -> None:
    r = _measure(agent, tiny_artifact, min_runs=5, min_seconds=0.3, ci_target=None,
                 energy={"source": "command", "command": ["echo", "3.0"], "idle_s": 0})
    e = r["energy"]
    assert e["idle_power_w"] is None and "not subtracted" in e["note"]
    # window_s is reported rounded to 1 us: over a ~0.3 s window that is a relative 2e-6.
    assert e["energy_per_inference_mj"] == pytest.approx(3.0 * e["window_s"] / r["runs"] * 1e3,
                                                          rel=1e-5)


def test_a_failing_meter_command_is_refused(agent: AgentProcess, tiny_artifact: Artifact) -> None:
    r = agent.request({"op": "measure", "artifact": str(tiny_artifact.path),
                       "energy": {"source": "command", "command": "false"}})
    assert r["ok"] is False and r["kind"] == "energy_unavailable" and "false" in r["error"]


# ---------------------------------------------------------------------------- thermal


@pytest.fixture
def thermal_dir(tmp_path: Path) -> Path:
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("45000\n")
    return zone.parent


def test_steady_temperature_settles_within_a_window(agent: AgentProcess, tiny_artifact: Artifact,
                                                   thermal_dir: Path) -> None:
    r = _measure(agent, tiny_artifact, min_runs=5, min_seconds=0,
                 thermal={"path": str(thermal_dir), "window_s": 0.3, "settle_max_s": 5})
    assert r["thermal"]["settled"] is True and 0.3 <= r["thermal"]["settle_s"] < 5
    assert r["temp_before_c"] == 45.0 and r["temp_after_c"] == 45.0


@pytest.fixture
def heating(thermal_dir: Path) -> Iterator[Path]:
    """The zone's temperature rises 1 °C every 50 ms until the test ends."""
    stop = threading.Event()

    def heat() -> None:
        t = 45000
        while not stop.wait(0.05):
            t += 1000
            tmp = thermal_dir / "thermal_zone0" / ".temp"
            tmp.write_text(f"{t}\n")
            tmp.replace(thermal_dir / "thermal_zone0" / "temp")  # sysfs never shows half a number

    th = threading.Thread(target=heat)
    th.start()
    yield thermal_dir
    stop.set()
    th.join()


def test_a_temperature_that_keeps_rising_is_waited_for_only_up_to_the_bound(
    agent: AgentProcess, tiny_artifact: Artifact, heating: Path
) -> None:
    # min_seconds spans several 50 ms steps, so "after" is hotter than "before".
    r = _measure(agent, tiny_artifact, min_runs=5, min_seconds=0.25, ci_target=None,
                 thermal={"path": str(heating), "window_s": 0.2, "settle_max_s": 0.6})
    assert r["thermal"]["settled"] is False and 0.6 <= r["thermal"]["settle_s"] < 2.0
    assert r["temp_after_c"] > r["temp_before_c"] > 45.0
