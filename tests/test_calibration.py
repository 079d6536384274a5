"""Calibration: the metrics against hand-computed values, temperature fitting, the temperature
method and its op on every backend, RDeepSense's fine-tuning, and the candidates' fields."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet._litert import available as litert_available
from deepfleet.api import export_artifact
from deepfleet.artifact import save_artifact
from deepfleet.calibration import T_MAX, T_MIN, brier, calibration, ece, fit_temperature, nll
from deepfleet.candidate import Candidate
from deepfleet.compressors import make_compressor, run_pipeline
from deepfleet.compressors._calibrate import mc_logits, rdeepsense_loss, with_temperature
from deepfleet.compressors.training import logits_of
from deepfleet.data import Dataset
from deepfleet.device_agent.backends import BACKEND_CLASSES, BACKEND_FILES
from deepfleet.errors import ConfigError
from deepfleet.metrics import METRICS, candidate_value
from tests.conftest import TinyCNN, quick_context

# Four samples, two classes: probabilities (confidence 0.9, 0.75, 0.7, 0.62, the second wrong).
PROBS = np.array([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.62, 0.38]])
LABELS = np.array([0, 1, 1, 0])
LOGITS = np.log(PROBS)


def test_ece_nll_and_brier_match_hand_computed_values() -> None:
    # 15 bins: each confidence alone in its bin -> mean of |correct - confidence|
    assert ece(LOGITS, LABELS) == pytest.approx((0.1 + 0.75 + 0.3 + 0.38) / 4, abs=1e-12)
    # 2 bins: all four in (0.5, 1] -> |accuracy - mean confidence|
    assert ece(LOGITS, LABELS, bins=2) == pytest.approx(abs(0.75 - (0.9 + 0.75 + 0.7 + 0.62) / 4), abs=1e-12)
    assert nll(LOGITS, LABELS) == pytest.approx(-(math.log(0.9) + math.log(0.25) + math.log(0.7) + math.log(0.62)) / 4)
    assert brier(LOGITS, LABELS) == pytest.approx((0.02 + 2 * 0.75**2 + 2 * 0.3**2 + 2 * 0.38**2) / 4)
    assert calibration(LOGITS, LABELS) == {"ece": ece(LOGITS, LABELS), "nll": nll(LOGITS, LABELS),
                                           "brier": brier(LOGITS, LABELS)}


def test_a_perfectly_calibrated_certain_model_scores_zero() -> None:
    logits = np.array([[50.0, 0.0], [0.0, 50.0]])
    y = np.array([0, 1])
    assert ece(logits, y) == pytest.approx(0, abs=1e-12)
    assert nll(logits, y) == pytest.approx(0, abs=1e-12) and brier(logits, y) == pytest.approx(0, abs=1e-12)


def test_fit_temperature_recovers_the_temperature_of_the_labels() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(20000, 5))
    p = np.exp(z / 2.5)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.05)
    for other in (1.0, 2.0, 3.0, T_MIN, T_MAX):
        assert nll(z / t, y) <= nll(z / other, y) + 1e-12
    assert T_MIN <= fit_temperature(z * 1e-6, y) <= T_MAX  # a flat model hits a bound, not infinity


def _tiny_overconfident(digits: Dataset) -> nn.Module:
    """TinyCNN trained for a few epochs, its logits multiplied by 8: overconfident."""
    from deepfleet.compressors.training import TrainConfig, train

    torch.manual_seed(0)
    model = TinyCNN()
    model, _ = train(model, digits, TrainConfig(epochs=3, lr=3e-3), progress=False)
    with torch.no_grad():
        model.fc2.weight.mul_(8)
        model.fc2.bias.mul_(8)
    return model.eval()


def test_temperature_method_lowers_the_validation_nll_and_keeps_every_prediction(tiny_digits: Dataset) -> None:
    model = _tiny_overconfident(tiny_digits)
    res = run_pipeline(model, tiny_digits, [make_compressor("temperature")], ctx=quick_context())
    info = res.steps[0]["info"]
    assert info["fitted"] and info["temperature"] > 1  # softens an 8x overconfident model
    assert info["val_after"]["nll"] < info["val_before"]["nll"]  # T = 1 was a candidate, and worse
    before, after = logits_of(model, tiny_digits.X_test), logits_of(res.model, tiny_digits.X_test)
    assert torch.equal(before.argmax(1), after.argmax(1))
    assert torch.allclose(after, before / info["temperature"], rtol=1e-6)
    assert res.kept_params(sum(p.numel() for p in model.parameters())) == 1.0


def test_a_given_temperature_is_used_and_bad_ones_are_one_clear_error(tiny_digits: Dataset) -> None:
    res = run_pipeline(TinyCNN().eval(), tiny_digits, [make_compressor("temperature", {"temperature": 2.0})],
                       ctx=quick_context())
    assert res.steps[0]["info"]["temperature"] == 2.0 and not res.steps[0]["info"]["fitted"]
    for bad in (0, -1.0, 25, "hot", True):
        with pytest.raises(ConfigError) as err:
            make_compressor("temperature", {"temperature": bad})
        assert str(err.value) == (f"temperature: temperature must be a number in [{T_MIN}, {T_MAX}] (or null to "
                                  f"fit it on the validation split), but got {bad!r}")


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_temperature_op_oracle_on_every_backend(tiny_digits: Dataset, tmp_path: Path) -> None:
    """numpy, onnxruntime and torch (TorchScript) all run the artifact's temperature op as the
    torch model computes it."""
    model = with_temperature(TinyCNN().eval(), float(np.float32(3.7)))
    ex, files = export_artifact(model, model="tiny", data=tiny_digits, seed=0, compressor={"methods": ["temperature"]},
                                val_accuracy=0.0)
    assert ex.graph["ops"][-1]["op"] == "temperature"
    art = save_artifact(tmp_path, files).path
    x = tiny_digits.X_test[:16]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, torch.as_tensor(x[:1])).save(str(art / BACKEND_FILES["torch"]))
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    for name, cls in BACKEND_CLASSES.items():
        if name == "litert" and not litert_available():
            continue  # no model.tflite without the extra; `make test-litert` runs this test with it
        backend = cls(str(art))
        out = backend.numpy_outputs(backend.run(backend.prepare(x)))[0]
        assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max(), name


def test_rdeepsense_loss_is_the_weighted_sum_of_nll_and_mse() -> None:
    logits = torch.as_tensor(LOGITS, dtype=torch.float64)
    y = torch.as_tensor(LABELS)
    assert float(rdeepsense_loss(0.0)(logits, y)) == pytest.approx(nll(LOGITS, LABELS))
    assert float(rdeepsense_loss(1.0)(logits, y)) == pytest.approx(brier(LOGITS, LABELS))
    assert float(rdeepsense_loss(0.25)(logits, y)) == pytest.approx(
        0.75 * nll(LOGITS, LABELS) + 0.25 * brier(LOGITS, LABELS))


def test_rdeepsense_fine_tunes_with_dropout_and_deploys_the_deterministic_network(tiny_digits: Dataset) -> None:
    model = _tiny_overconfident(tiny_digits)
    res = run_pipeline(model, tiny_digits, [make_compressor("rdeepsense", {"dropout": 0.3, "samples": 4})],
                       ctx=quick_context())
    info = res.steps[0]["info"]
    assert info["dropout_layers"] == 2  # the inputs of fc1 and fc2 (conv1, the first layer, reads the image)
    assert {"ece", "nll", "brier", "accuracy"} <= set(info["mc"]) and info["mc"]["samples"] == 4
    x = torch.as_tensor(tiny_digits.X_test[:8])
    with torch.no_grad():  # no dropout hook is left behind: the deployed network is deterministic
        assert torch.equal(res.model(x), res.model(x))
    mc = mc_logits(res.model, tiny_digits.X_test[:8], 0.3, 4)
    assert not np.allclose(mc, torch.log_softmax(res.model(x), 1).detach().numpy(), atol=1e-4)


def test_calibration_metrics_are_candidate_metrics() -> None:
    for name in ("ece", "nll", "brier"):
        m = METRICS[name]
        assert m.source == "candidate" and m.direction == "minimize" and m.field in Candidate.__dataclass_fields__
    cand = Candidate(model="m", data="d", method="deepiot", artifact_hash="h", accuracy_val=0.9, accuracy_test=0.9,
                     accuracy_drop_pp=0.0, ece=0.03, nll=0.4, brier=0.2, params=1, macs=1, bytes=1, kept_params=1.0)
    assert candidate_value("ece", cand) == 0.03 and candidate_value("brier", cand.to_dict()) == 0.2
    assert Candidate.from_dict(cand.to_dict()) == cand
