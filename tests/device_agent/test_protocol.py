"""The agent's JSON-lines protocol, spoken to a real ``python agent.py serve`` subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfleet.artifact import Artifact
from deepfleet.device_agent.agent import AGENT_VERSION
from deepfleet.device_agent.runtime import load_model
from tests.conftest import TINY_SHAPE, AgentProcess, tiny_model


def _copy(art: Artifact, root: Path) -> Path:
    """A private copy of an artifact (same directory name, i.e. same expected hash)."""
    dest = root / art.path.name
    shutil.copytree(art.path, dest)
    return dest


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_hello_reports_agent_device_and_runtimes(agent: AgentProcess) -> None:
    r = agent.request({"op": "hello", "id": 7})
    assert r["ok"] is True and r["op"] == "hello" and r["id"] == 7
    assert r["agent_version"] == AGENT_VERSION
    assert r["pid"] == agent.pid
    assert r["python"] == platform.python_version()
    assert r["numpy"] == np.__version__
    assert r["machine"] == platform.machine()
    assert r["cpu_count"] == os.cpu_count()
    assert r["affinity"] == sorted(os.sched_getaffinity(0))
    assert isinstance(r["cpu_model"], str) and r["cpu_model"]
    assert isinstance(r["thermal_zones"], list) and isinstance(r["energy_sources"], list)
    assert "governor" in r and "freq_mhz" in r
    assert r["backends"][0] == "numpy"
    assert ("torch" in r["backends"]) == (importlib.util.find_spec("torch") is not None)
    assert set(r["ops"]) == {"hello", "ping", "measure", "infer", "bye"}
    assert r["blas"]["library"] is None or isinstance(r["blas"]["library"], str)


def test_hello_finds_a_sensor_under_a_path_override(agent: AgentProcess,
                                                    start_powersim: Callable[..., Path]) -> None:
    sim = start_powersim(pids=[agent.pid])
    r = agent.request({"op": "hello", "energy": {"path": str(sim)}})
    found = [s for s in r["energy_sources"] if s["path"] == str(sim / "hwmon0")]
    assert found and found[0]["source"] == "hwmon" and found[0]["simulated"] is True


def test_infer_outputs_equal_the_in_process_runtime(agent: AgentProcess,
                                                    tiny_artifact: Artifact) -> None:
    x = np.random.default_rng(3).standard_normal((4, *TINY_SHAPE), dtype=np.float32)
    r = agent.request({"op": "infer", "artifact": str(tiny_artifact.path), "input": x.tolist()})
    assert r["ok"], r
    expected = load_model(str(tiny_artifact.path)).run(x)
    got = np.asarray(r["outputs"][0], dtype=np.float32)
    assert r["shapes"] == [list(expected.shape)]
    np.testing.assert_array_equal(got, expected)  # same runtime, same input: bit-identical
    # and the runtime is the exported model (oracle: torch)
    with torch.no_grad():
        np.testing.assert_allclose(got, tiny_model()(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_infer_rejects_an_input_of_the_wrong_shape(agent: AgentProcess,
                                                   tiny_artifact: Artifact) -> None:
    r = agent.request({"op": "infer", "artifact": str(tiny_artifact.path), "input": [[1.0, 2.0]]})
    assert r["ok"] is False and r["kind"] == "bad_request" and "shape" in r["error"]


def test_malformed_lines_and_unknown_ops_fail_and_the_agent_keeps_serving(agent: AgentProcess) -> None:
    agent.send_raw(b"this is not json\n")
    r = json.loads(agent.read_line())
    assert r == {"ok": False, "kind": "bad_request", "op": None, "error": r["error"],
                 "agent_ms": r["agent_ms"]} and "JSON" in r["error"]
    agent.send_raw(b"[1, 2]\n")
    assert json.loads(agent.read_line())["kind"] == "bad_request"
    agent.send_raw(b"\xff\xfe\n")  # not UTF-8
    assert json.loads(agent.read_line())["kind"] == "bad_request"
    r = agent.request({"op": "teleport", "id": "x"})
    assert r["ok"] is False and r["kind"] == "bad_request" and r["id"] == "x"
    assert "teleport" in r["error"] and "measure" in r["error"]  # names the bad op and the good ones
    r = agent.request({"op": "measure", "artifact": "/x", "warmpu": 3})
    assert r["kind"] == "bad_request" and "warmpu" in r["error"]
    r = agent.request({"op": "measure", "artifact": "/x", "min_runs": 50, "max_runs": 10})
    assert r["kind"] == "bad_request" and "min_runs=50" in r["error"]
    for bad, needle in (({"backend": "tflite"}, "auto, numpy, onnxruntime, torch"),
                        ({"backends": ["numpy", "numpy"]}, "distinct runtimes"),
                        ({"backends": []}, "non-empty list"),
                        ({"backends": "numpy"}, "'backends' must be"),
                        ({"fresh": 1}, "'fresh' must be true or false"),
                        ({"power": {"idle_w": 1}}, "power.'active_w' is required"),
                        ({"power": {"active_w": -1}}, "power.'active_w' must be watts > 0"),
                        ({"power": {"active_w": 1, "peak_w": 2}}, "power: unknown field(s) 'peak_w'")):
        r = agent.request({"op": "measure", "artifact": "/x", **bad})
        assert r["kind"] == "bad_request" and needle in r["error"], (bad, r["error"])
    r = agent.request({"op": "measure", "artifact": "/x", "batch": True})
    assert r["kind"] == "bad_request" and "'batch'" in r["error"]
    r = agent.request({"op": "measure"})
    assert r["kind"] == "bad_request" and "'artifact' is required" in r["error"]
    assert agent.request({"op": "ping"}) == {"ok": True, "op": "ping", "agent_ms": pytest.approx(0, abs=50)}


def test_missing_artifact_is_reported_as_missing(agent: AgentProcess, tmp_path: Path) -> None:
    r = agent.request({"op": "measure", "artifact": str(tmp_path / "nope")})
    assert r["ok"] is False and r["kind"] == "artifact_missing" and "nope" in r["error"]


@pytest.mark.parametrize("victim", ["weights.npz", "graph.json", "manifest.json"])
def test_corrupt_artifact_fails_and_the_agent_keeps_serving(
    agent: AgentProcess, tiny_artifact: Artifact, tmp_path: Path, victim: str
) -> None:
    art = _copy(tiny_artifact, tmp_path)
    _flip_byte(art / victim)
    r = agent.request({"op": "measure", "artifact": str(art), "min_seconds": 0})
    assert r["ok"] is False and r["kind"] == "artifact_corrupt" and "upload it again" in r["error"]
    assert agent.request({"op": "ping"})["ok"] is True


def test_an_artifact_corrupted_after_loading_is_detected(agent: AgentProcess,
                                                        tiny_artifact: Artifact,
                                                        tmp_path: Path) -> None:
    art = _copy(tiny_artifact, tmp_path)
    quick = {"op": "measure", "artifact": str(art), "min_seconds": 0, "min_runs": 5,
             "max_runs": 5, "warmup": 0, "energy": {"source": "none"}, "fresh": False}
    first = agent.request(quick)
    assert first["ok"] and first["model_cached"] is False
    assert agent.request(quick)["model_cached"] is True  # loaded once, cached by hash
    assert agent.request({**quick, "fresh": True})["model_cached"] is False  # timed afresh
    time.sleep(0.01)  # a distinct mtime even on coarse-clock file systems
    _flip_byte(art / "weights.npz")
    r = agent.request(quick)
    assert r["ok"] is False and r["kind"] == "artifact_corrupt"


def test_backend_without_its_file_is_refused(agent: AgentProcess, tiny_artifact: Artifact) -> None:
    r = agent.request({"op": "measure", "artifact": str(tiny_artifact.path), "backend": "torch"})
    assert r["ok"] is False and r["kind"] == "artifact_missing" and "model.ts" in r["error"]


def test_onnxruntime_missing_is_backend_unavailable(start_agent: Callable[..., AgentProcess],
                                                    python_without_onnxruntime: str,
                                                    tiny_artifact: Artifact, tmp_path: Path) -> None:
    agent = start_agent(python=python_without_onnxruntime)
    art = _copy(tiny_artifact, tmp_path)
    (art / "model.onnx").write_bytes(b"not needed: the import fails first")
    r = agent.request({"op": "measure", "artifact": str(art), "backend": "onnxruntime"})
    assert r["ok"] is False and r["kind"] == "backend_unavailable" and "onnxruntime" in r["error"]
    assert "install onnxruntime" in r["error"] and "'numpy'" in r["error"]  # the fix


# TorchScript is deprecated in torch 2.13 but is what small devices' torch builds load.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_torch_backend_measures_a_torchscript_file(agent: AgentProcess, tiny_artifact: Artifact,
                                                  tmp_path: Path) -> None:
    art = _copy(tiny_artifact, tmp_path)
    torch.jit.trace(tiny_model(), torch.zeros(1, *TINY_SHAPE)).save(str(art / "model.ts"))
    r = agent.request({"op": "measure", "artifact": str(art), "backend": "torch", "threads": 1,
                       "min_seconds": 0, "min_runs": 20, "warmup": 2, "energy": {"source": "none"}},
                      timeout=120)
    assert r["ok"], r
    assert r["backend"] == "torch" and r["threads"] == 1 and r["runs"] >= 20
    assert len(r["backend_file_sha256"]) == 64
    x = np.random.default_rng(0).standard_normal((2, *TINY_SHAPE), dtype=np.float32)
    out = agent.request({"op": "infer", "artifact": str(art), "backend": "torch", "input": x.tolist()})
    np.testing.assert_allclose(np.asarray(out["outputs"][0]), load_model(str(art)).run(x), atol=1e-5)


def test_bye_answers_then_exits_zero(agent: AgentProcess) -> None:
    assert agent.request({"op": "bye", "id": 1}) == {"ok": True, "op": "bye", "id": 1,
                                                      "agent_ms": pytest.approx(0, abs=50)}
    assert agent.proc.wait(10) == 0


def test_end_of_input_exits_zero(agent: AgentProcess) -> None:
    assert agent.proc.stdin is not None
    agent.proc.stdin.close()
    assert agent.proc.wait(10) == 0


def test_stray_prints_cannot_corrupt_the_protocol_stream(agent: AgentProcess) -> None:
    # The agent moved fd 1 to stderr; a print from a runtime would land there, not in a reply.
    r = agent.request({"op": "hello"})
    assert r["ok"]
    agent.request({"op": "bye"})
    agent.proc.wait(10)
    assert "serving" in agent.stderr()  # diagnostics go to stderr


def test_per_request_overhead_is_milliseconds(agent: AgentProcess) -> None:
    agent.request({"op": "ping"})
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        assert agent.request({"op": "ping"})["ok"]
        times.append(time.perf_counter() - t0)
    # Generous bound against a loaded CI machine; real figures: benchmarks/agent_overhead.py.
    assert statistics.median(times) < 0.05
