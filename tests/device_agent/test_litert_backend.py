"""The agent's litert backend through the built agent: ``auto`` takes it only where the device
lists it, a batch runs sample by sample and the row says so, and a device without a LiteRT
interpreter answers backend_unavailable naming the fix."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepfleet.artifact import Artifact
from tests.conftest import AgentProcess

QUICK: dict[str, Any] = {"op": "measure", "warmup": 2, "min_runs": 10, "max_runs": 10, "min_seconds": 0,
                         "ci_target": None, "energy": {"source": "none"}, "thermal": {"settle_max_s": 0}}


def _measure(agent: AgentProcess, art: Path, **fields: Any) -> dict[str, Any]:
    return agent.request({**QUICK, "artifact": str(art), **fields}, timeout=120)


def test_auto_takes_litert_only_where_the_device_lists_it(shared_agent: AgentProcess,
                                                          tiny_litert_artifact: Artifact) -> None:
    import ai_edge_litert

    hello = shared_agent.request({"op": "hello"})
    assert "litert" in hello["backends"] and hello["backend_versions"]["litert"] == ai_edge_litert.__version__
    default = _measure(shared_agent, tiny_litert_artifact.path)
    assert default["ok"] and default["backend"] == "onnxruntime"  # not in the default preference
    r = _measure(shared_agent, tiny_litert_artifact.path, backends=["litert", "numpy"], batch=1)
    assert r["ok"] and r["backend"] == "litert" and r["backend_note"] is None
    assert r["backend_version"] == ai_edge_litert.__version__
    assert r["provider"].startswith("ai_edge_litert.interpreter")
    assert r["backend_file_sha256"] == tiny_litert_artifact.manifest["tflite"]["sha256"]
    assert r["threads"] == 1 and r["runs"] == 10  # one thread unless asked
    b4 = _measure(shared_agent, tiny_litert_artifact.path, backend="litert", batch=4, threads=2)
    assert b4["ok"] and b4["threads"] == 2
    assert "batch of 4 runs as 4 invocations" in b4["backend_note"]


def test_a_device_without_a_litert_interpreter_answers_backend_unavailable(
        start_agent: Callable[..., AgentProcess], python_without_onnxruntime: str,
        tiny_artifact: Artifact, tmp_path: Path) -> None:
    agent = start_agent(python=python_without_onnxruntime)  # numpy only, like an armhf board
    assert "litert" not in agent.request({"op": "hello"})["backends"]
    art = tmp_path / tiny_artifact.path.name
    shutil.copytree(tiny_artifact.path, art)
    (art / "model.tflite").write_bytes(b"not needed: the import fails first")
    r = _measure(agent, art, backend="litert")
    assert r["ok"] is False and r["kind"] == "backend_unavailable"
    assert "backend 'litert'" in r["error"] and "ai_edge_litert" in r["error"]
    assert "pip install ai-edge-litert" in r["error"] and "tflite-runtime==2.14" in r["error"]
    assert "backend 'onnxruntime'" in r["error"] and "backend 'numpy'" in r["error"]  # other fixes
    auto = _measure(agent, art, backends=["litert", "numpy"])  # auto passes over it, saying why
    assert auto["ok"] and auto["backend"] == "numpy" and "litert not installed" in auto["backend_note"]
