"""measure_many on the built-in local device: rows as they finish, references, drift, bad input."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepfleet.artifact import Artifact
from deepfleet.device_agent.runtime import load_model
from deepfleet.errors import ArtifactError, ConfigError
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.measure import MeasureSettings, Outcome, measure_many
from deepfleet.orchestrator.reference import (
    REFERENCE_DIGEST,
    ReferenceTracker,
    reference_artifact,
)
from deepfleet.orchestrator.results import read_results
from tests.conftest import QUICK_REQUEST

QUICK = MeasureSettings(request=QUICK_REQUEST, reference_request=QUICK_REQUEST)


def test_every_artifact_is_measured_and_each_row_is_written_when_it_ends(
        local_device: Device, tiny_artifact: Artifact, tmp_path: Path) -> None:
    root = tmp_path / "results"
    seen: list[tuple[bool, int]] = []

    def on_outcome(o: Outcome) -> None:
        # Called as each measurement ends: its row is already on disk by then.
        seen.append((o.reference, len(read_results(root))))

    outcomes = measure_many([local_device], [tiny_artifact.path, str(tiny_artifact.path)],
                            results_root=root, settings=QUICK, study="s1", trial=7,
                            on_outcome=on_outcome)
    assert [o.reference for o in outcomes] == [True, False, False]
    assert seen == [(True, 1), (False, 2), (False, 3)]
    assert all(o.ok and o.rows_written == 1 and o.error is None for o in outcomes), outcomes
    ref, first, second = outcomes
    assert ref.artifact_hash == REFERENCE_DIGEST and ref.drift == 0.0
    assert first.artifact == str(tiny_artifact.path) and first.artifact_hash == tiny_artifact.digest
    assert 0 < first.p50_ms <= first.p90_ms <= first.p99_ms  # type: ignore[operator]
    assert first.drift == 0.0 and first.energy_kind == "estimated" and first.energy_mj is None
    assert first.estimated_energy_mj is not None and first.estimated_energy_mj > 0
    df = read_results(root)
    assert list(df["reference"]) == [True, False, False] and set(df["trial"]) == {7}
    assert set(df["study"]) == {"s1"} and set(df["device"]) == {"local"}
    assert df["drift"].tolist() == [0.0, 0.0, 0.0] and df["error"].isna().all()
    assert (df.loc[~df["reference"], "runs"] == 5).all()


def test_references_recur_every_k_measurements_and_drift_is_relative_to_the_first(
        local_device: Device, tiny_artifact: Artifact, tmp_path: Path) -> None:
    tracker = ReferenceTracker()
    settings = MeasureSettings(request=QUICK_REQUEST, reference_request=QUICK_REQUEST,
                               reference_every=2)
    outcomes = measure_many([local_device], [tiny_artifact.path] * 5, results_root=tmp_path,
                            settings=settings, tracker=tracker)
    assert [o.reference for o in outcomes] == [True, False, False, True, False, False, True, False]
    refs = [o for o in outcomes if o.reference]
    first_p50 = refs[0].p50_ms
    assert first_p50 is not None
    for ref in refs:
        assert ref.drift == pytest.approx(ref.p50_ms / first_p50 - 1)  # type: ignore[operator]
    # Each measurement carries the drift of the reference measured just before it.
    assert [o.drift for o in outcomes[4:6]] == [refs[1].drift] * 2
    # The tracker carries the schedule into the next call: 1 measurement since the last reference.
    again = measure_many([local_device], [tiny_artifact.path], results_root=tmp_path,
                         settings=settings, tracker=tracker)
    assert [o.reference for o in again] == [False]
    assert again[0].drift == tracker.drift("local") == refs[-1].drift


def test_tracker_keeps_a_failed_reference_due() -> None:
    t = ReferenceTracker()
    assert t.due("d", 3) and not t.due("d", 0) and t.drift("d") is None
    t.counted("d")  # the first reference failed: still due
    assert t.due("d", 3)
    assert t.record("d", 2.0) == 0.0 and not t.due("d", 3)
    for _ in range(3):
        t.counted("d")
    assert t.due("d", 3)
    assert t.record("d", 2.5) == pytest.approx(0.25) and t.drift("d") == pytest.approx(0.25)


def test_the_reference_model_is_the_same_everywhere_and_runs_like_an_mlp(tmp_path: Path) -> None:
    a, b = reference_artifact(tmp_path / "a"), reference_artifact(tmp_path / "b")
    assert a.digest == b.digest == REFERENCE_DIGEST  # integer recipe: no RNG, no libm
    (a.path / "weights.npz").write_bytes(b"damaged")
    assert reference_artifact(tmp_path / "a").digest == REFERENCE_DIGEST  # rebuilt, not trusted
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    with np.load(b.path / "weights.npz") as w:
        h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
        h = np.maximum(h @ w["fc2.weight"].T + w["fc2.bias"], 0)
        expected = h @ w["fc3.weight"].T + w["fc3.bias"]
    np.testing.assert_allclose(load_model(str(b.path)).run(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("backend", "reference_backend"), [
    ("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("torch", None), ("litert", None), ("auto", "auto")])
def test_the_reference_runs_in_the_candidates_runtime_when_it_has_its_file(
        tmp_path: Path, backend: str, reference_backend: str | None) -> None:
    """--backend torch or litert used to fail every reference with artifact_missing (the fixed
    reference has graph.json and model.onnx only): it then runs in the device's own choice."""
    from deepfleet.device_agent.format import BACKEND_FILES
    from deepfleet.orchestrator.reference import REFERENCE_BACKENDS

    ref = MeasureSettings(request={"backend": backend, "threads": 1}).reference()
    assert ref.get("backend") == reference_backend and ref["threads"] == 1
    # the constant says what the artifact has: a backend's file exactly when it is listed
    path = reference_artifact(tmp_path).path
    assert "numpy" in REFERENCE_BACKENDS and (path / "graph.json").is_file()
    for name, file in BACKEND_FILES.items():
        assert (path / file).is_file() == (name in REFERENCE_BACKENDS), name


def test_sessions_given_by_the_caller_are_reused_and_left_open(
        local_device: Device, tiny_artifact: Artifact, tmp_path: Path) -> None:
    sessions: dict[str, DeviceSession] = {}
    settings = MeasureSettings(request=QUICK_REQUEST, reference_every=0)
    try:
        for _ in range(2):
            (o,) = measure_many([local_device], [tiny_artifact.path], results_root=tmp_path,
                                settings=settings, sessions=sessions)
            assert o.ok, o.error
        session = sessions["local"]
        assert session.connects == 1  # one agent for both calls
        assert session.hello["pid"] and session._proc is not None and session._proc.poll() is None
    finally:
        for s in sessions.values():
            s.close()


@pytest.mark.parametrize("what", ["missing", "corrupt", "duplicate", "setting", "study"])
def test_bad_input_is_refused_before_anything_is_contacted_or_written(
        what: str, local_device: Device, tiny_artifact: Artifact, tmp_path: Path,
        fast_session: Callable[[Device], DeviceSession]) -> None:
    artifacts: list[Path] = [tiny_artifact.path]
    devices = [local_device]
    settings, study = QUICK, "s"
    if what == "missing":
        artifacts = [tmp_path / "nope"]
        expected: tuple[type[Exception], str] = (ConfigError, r"artifact '.*nope' does not exist")
    elif what == "corrupt":
        bad = tmp_path / "copy" / tiny_artifact.digest
        shutil.copytree(tiny_artifact.path, bad)
        (bad / "manifest.json").write_text("{}")
        artifacts = [bad]
        expected = (ArtifactError, "is corrupt: its content hashes to")
    elif what == "duplicate":
        devices = [local_device, local_device]
        expected = (ConfigError, r"device\(s\) \['local'\] given more than once")
    elif what == "setting":
        expected = (ConfigError, r"unknown field\(s\) 'runs'")
        with pytest.raises(expected[0], match=expected[1]):
            MeasureSettings(request={"runs": 5})
        return
    else:
        study = ""
        expected = (ConfigError, "study must be a non-empty name")
    made: list[Device] = []

    def factory(device: Device) -> DeviceSession:
        made.append(device)
        return fast_session(device)

    with pytest.raises(expected[0], match=expected[1]):
        measure_many(devices, artifacts, results_root=tmp_path / "results", settings=settings,
                     study=study, session_factory=factory)
    assert made == [] and not (tmp_path / "results").exists()


def test_a_device_that_fails_gives_failure_rows_and_the_others_still_measure(
        local_device: Device, tiny_artifact: Artifact, tmp_path: Path,
        python_without_numpy: str, fast_session: Callable[[Device], DeviceSession]) -> None:
    import dataclasses

    broken = dataclasses.replace(local_device, name="no-numpy", python=python_without_numpy)
    outcomes = measure_many([broken, local_device], [tiny_artifact.path] * 2,
                            results_root=tmp_path / "results", settings=QUICK,
                            session_factory=fast_session)
    by_device = {d: [o for o in outcomes if o.device == d] for d in ("no-numpy", "local")}
    assert [o.ok for o in by_device["local"]] == [True, True, True]
    first, second = by_device["no-numpy"]  # no reference: the device never answered
    assert not first.ok and "device 'no-numpy'" in (first.error or "")
    assert "has no numpy" in (first.error or "") and python_without_numpy in (first.error or "")
    assert (second.error or "").startswith("not measured: device 'no-numpy'")
    df = read_results(tmp_path / "results")
    failed = df[df["device"] == "no-numpy"]
    assert len(failed) == 2 and failed["error"].notna().all() and failed["p50_ms"].isna().all()
    assert (failed["artifact_hash"] == tiny_artifact.digest).all()
    assert pd.isna(failed["drift"]).all() and (failed["model_name"] == "tiny").all()


def test_ctrl_c_lets_each_device_finish_its_measurement_and_start_no_other(
        local_device: Device, tiny_artifact: Artifact, tmp_path: Path) -> None:
    import signal
    import threading
    import time

    slow = {**QUICK_REQUEST, "max_runs": 10**6, "min_seconds": 0.5, "max_seconds": 0.5}
    root = tmp_path / "results"
    timer = threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,))
    start = time.monotonic()
    # Ctrl-C as a terminal delivers it: Python's own handler (a library started earlier in the
    # session may have left another; once in CI the interrupt never surfaced)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            timer.start()  # inside the block: the interrupt can only land where it is expected
            measure_many([local_device], [tiny_artifact.path] * 20, results_root=root,
                         settings=MeasureSettings(request=slow, reference_every=0))
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 10  # 20 x 0.5 s were asked for
    df = read_results(root)
    assert 1 <= len(df) < 20 and df["error"].isna().all() and (df["runs"] > 0).all()


def test_rows_carry_the_sensing_energy_of_the_kept_sensors_from_the_fleet_power(
        local_device: Device, tmp_path: Path) -> None:
    import dataclasses

    from deepfleet import metrics
    from deepfleet.artifact import write_artifact
    from deepfleet.compressors._export import export_graph
    from deepfleet.orchestrator.fleet import SensorPower
    from tests.conftest import TINY_SHAPE, tiny_model

    ex = export_graph(tiny_model(), TINY_SHAPE)
    common = {"model": "tiny", "params": ex.params, "macs": ex.macs, "input_shape": list(TINY_SHAPE),
              "window_s": 2.0, "inputs_kept": None}
    arts = [write_artifact(tmp_path / "a", ex.graph, ex.arrays, {**common, "sensors_kept": kept})
            for kept in (["acc", "gyro"], ["acc"], ["mic"])]
    device = dataclasses.replace(local_device, sensors=(SensorPower(name="acc", mw=0.5),
                                                        SensorPower(name="gyro", mw=5.0)))
    outcomes = measure_many([device], [a.path for a in arts], results_root=tmp_path / "r",
                            settings=MeasureSettings(request=QUICK_REQUEST), study="s")
    both, acc, mic = (o.row for o in outcomes if not o.reference)
    assert both["sensing_energy_mj"] == pytest.approx(5.5 * 2.0) and acc["sensing_energy_mj"] == 1.0
    assert mic["sensing_energy_mj"] is None and "no power for mic" in mic["sensing_basis"]
    df = read_results(tmp_path / "r")  # the columns round-trip through Parquet
    assert df.loc[~df["reference"], "sensing_energy_mj"].tolist()[:2] == [11.0, 1.0]
    total = metrics.row_value("energy_total", acc)
    assert total == pytest.approx(acc["estimated_energy_mj"] + 1.0)
