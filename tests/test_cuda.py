"""Compression on a GPU: every zoo model and every method through ``deepfleet.compress`` on CUDA.

Skipped where torch sees no GPU (CI has none). Self-contained on purpose (no fixture from
``conftest.py``) so that a GPU machine with torch, scikit-learn, click and tqdm but not the
cluster stack can run it: ``python -m pytest --noconftest tests/test_cuda.py``.
``DEEPFLEET_TEST_TORCH_DEVICE=cpu`` runs the same checks on the CPU (to check the test itself).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import deepfleet
from deepfleet.compressors import REGISTRY
from deepfleet.data import load_data
from deepfleet.device_agent.runtime import load_model

DEVICE = os.environ.get("DEEPFLEET_TEST_TORCH_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="torch sees no GPU (set DEEPFLEET_TEST_TORCH_DEVICE=cpu to run on the CPU)")

ZOO_DATA = {"mlp": "digits", "lenet5": "digits", "vgg": "digits", "bilstm": "sensing", "deepsense": "sensing",
            "deepear": "audio"}


def _compress(tmp_path, monkeypatch, model: str, method: str) -> dict:
    monkeypatch.setenv("DEEPFLEET_CACHE", str(tmp_path / "cache"))
    return deepfleet.compress(model, data=ZOO_DATA[model], method=method, quick=True, device=DEVICE,
                              out=tmp_path / "out", progress=False)


def _check_artifact(r: dict, data: str) -> None:
    """The exported artifact, run by the device runtime (numpy), predicts what the torch model
    on the GPU predicted: its test accuracy is the summary's, to one sample (a float32 argmax
    tie may fall the other way between cuBLAS and numpy)."""
    ds = load_data(data)
    pred = load_model(r["artifact"]).run(ds.X_test).argmax(1)
    assert abs(float((pred == ds.y_test).mean()) - r["accuracy_after"]) <= 1 / len(ds.y_test) + 1e-9


@pytest.mark.parametrize("model", list(ZOO_DATA))
def test_deepiot_compresses_every_zoo_model_on_the_gpu(model: str, tmp_path, monkeypatch) -> None:
    r = _compress(tmp_path, monkeypatch, model, "deepiot")
    assert r["device"].startswith(DEVICE)
    # TF32 is off inside compress(), so the extracted model equals the masked one to 1e-4
    assert r["extraction_error"] is not None and r["extraction_error"] < 1e-4
    assert r["params_after"] < r["params_before"]
    assert np.isfinite(r["accuracy_after"])
    _check_artifact(r, ZOO_DATA[model])


@pytest.mark.parametrize("method", [m for m in REGISTRY if m != "deepiot"] + ["deepiot,fixedpoint"])
def test_every_method_runs_on_the_gpu(method: str, tmp_path, monkeypatch) -> None:
    r = _compress(tmp_path, monkeypatch, "lenet5", method)
    assert r["device"].startswith(DEVICE)
    assert r["methods"] == method.split(",")
    _check_artifact(r, "digits")
