"""model.tflite: with the extra ``deepfleet[litert]`` every exported artifact carries a batch-1
LiteRT model checked against torch, declared (sha256) in its manifest like model.onnx, and the
agent's litert backend reproduces the numpy runtime on real samples; without the extra,
artifacts are as before."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from deepfleet import _litert
from deepfleet.api import export_artifact
from deepfleet.artifact import ONNX_FILE, TFLITE_FILE, artifact_files, open_artifact, save_artifact
from deepfleet.device_agent import agent, backends, format
from deepfleet.device_agent.protocol import AgentError
from deepfleet.errors import ArtifactError, ExportError
from deepfleet.models import build_model
from tests.conftest import LITERT_SKIP
from tests.test_onnx import _compress

needs_litert = pytest.mark.skipif(not _litert.available(), reason=LITERT_SKIP)


def _infer(path, backend: str, x: np.ndarray) -> np.ndarray:
    out = agent.infer({"op": "infer", "artifact": str(path), "backend": backend, "input": x.tolist()},
                      backends.ModelCache())
    assert out["ok"], out
    return np.asarray(out["outputs"][0], dtype=np.float32)


@needs_litert
@pytest.mark.parametrize("case", ["tiny_cnn deepiot", "mlp deepiot+fixedpoint"])
def test_a_compressed_artifact_carries_model_tflite_that_runs_like_the_numpy_runtime(
        case, tmp_path, tiny_cnn, tiny_digits) -> None:
    name, methods = case.split()
    if name == "mlp":
        torch.manual_seed(0)
        net = build_model("mlp", input_shape=tiny_digits.input_shape, num_classes=tiny_digits.num_classes)
    else:
        net = tiny_cnn
    small, encodings = _compress(net, tiny_digits, methods, fixedpoint={"bits": 8})
    _, files = export_artifact(small, model=name, data=tiny_digits, seed=0, compressor={"methods": methods},
                               val_accuracy=1.0, encodings=encodings)
    data = files.files[TFLITE_FILE]
    entry = files.manifest["tflite"]
    assert entry["file"] == TFLITE_FILE and entry["batch"] == 1
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["converter"].startswith("litert-torch 0.")
    # deterministic: the same model exported again has the same bytes, so the same hash
    assert export_artifact(small, model=name, data=tiny_digits, seed=0, compressor={"methods": methods},
                           val_accuracy=1.0, encodings=encodings)[1].digest == files.digest
    art = save_artifact(tmp_path, files)
    assert open_artifact(art.path).manifest["tflite"] == entry  # verified, model.tflite included
    assert artifact_files(art.path) == (*format.ARTIFACT_FILES, ONNX_FILE, TFLITE_FILE)  # shipped
    x = tiny_digits.X_test[:16]
    reference = _infer(art.path, "numpy", x)
    got = _infer(art.path, "litert", x)
    assert got.shape == reference.shape == (16, tiny_digits.num_classes)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    assert np.abs(reference).max() > 0.1  # a real comparison


def test_without_the_converter_artifacts_have_no_model_tflite(tiny_cnn, tiny_digits, monkeypatch) -> None:
    monkeypatch.setattr(_litert, "available", lambda: False)  # as without the extra
    _, files = export_artifact(tiny_cnn, model="tiny", data=tiny_digits, seed=0, compressor={},
                               val_accuracy=1.0)
    assert TFLITE_FILE not in files.files and "tflite" not in files.manifest
    assert ONNX_FILE in files.files  # the rest as before


@needs_litert
def test_a_model_tflite_that_differs_from_torch_is_refused_naming_the_error(tiny_cnn, tiny_digits) -> None:
    x = tiny_digits.X_val[:8]
    with torch.no_grad():
        right = tiny_cnn(torch.as_tensor(x)).numpy()
    assert _litert.export_tflite(tiny_cnn, tiny_digits.input_shape, x=x, expected=[right]).info["batch"] == 1
    with pytest.raises(ExportError, match=r"max \|LiteRT - torch\| is 0\.0[0-9]* of the largest output"):
        _litert.export_tflite(tiny_cnn, tiny_digits.input_shape, x=x, expected=[right * 1.05])


@needs_litert
def test_a_corrupt_model_tflite_is_seen_on_the_host_and_by_the_agent(tiny_litert_artifact, tmp_path) -> None:
    bad = tmp_path / "bad" / tiny_litert_artifact.path.name
    shutil.copytree(tiny_litert_artifact.path, bad)
    raw = bytearray((bad / TFLITE_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (bad / TFLITE_FILE).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="model.tflite"):
        open_artifact(bad)
    with pytest.raises(AgentError, match=str(bad / TFLITE_FILE)) as err:
        backends.ModelCache().get(str(bad), "litert")
    assert err.value.kind == "artifact_corrupt"
    # an undeclared file LiteRT cannot read: artifact_corrupt naming the file too
    plain = tmp_path / "plain" / tiny_litert_artifact.path.name
    shutil.copytree(tiny_litert_artifact.path, plain)
    manifest = plain / "manifest.json"
    undeclared = manifest.read_text().replace('"tflite"', '"tflite_old"')
    assert undeclared != manifest.read_text()
    (plain / TFLITE_FILE).write_bytes(b"not a flatbuffer" * 8)
    opened = {"directory": str(plain), "digest": "x", "manifest": {}, "verify_ms": 0.0}
    manifest.write_text(undeclared)  # the hash no longer matters: load it without the check
    with pytest.raises(AgentError, match=f"{TFLITE_FILE}.*cannot be loaded by LiteRT") as err:
        backends.ModelCache().load(opened, "litert")
    assert err.value.kind == "artifact_corrupt" and str(plain / TFLITE_FILE) in str(err.value)
