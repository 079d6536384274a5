"""BinaryConnect and binarised activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfleet.compressors import SignActivation, export_graph, make_compressor
from deepfleet.compressors.training import accuracy
from tests.conftest import quick_context, runtime_error


@pytest.mark.parametrize("stochastic", [False, True])
def test_weights_are_plus_or_minus_one_scale_per_tensor_and_export_as_bits(tiny_case, stochastic: bool) -> None:
    model, data = tiny_case
    res = make_compressor("binary", {"stochastic": stochastic}).compress(model, data, quick_context(epochs=2))
    params = dict(res.model.named_parameters())
    for name, enc in res.encodings.items():
        w = params[name].detach().numpy()
        H = enc.attrs["scale"]
        assert set(np.unique(w)) <= {np.float32(H), np.float32(-H)} and H > 0
        assert enc.arrays["bits"].dtype == np.uint8 and enc.arrays["bits"].size == -(-w.size // 8)
        assert np.array_equal(enc.decode(), w)
    err, _, _ = runtime_error(res.model, res.encodings, data)
    assert err < 1e-5


def test_binarised_activations_run_as_sign_ops_in_the_runtime(tiny_cnn, tiny_digits) -> None:
    res = make_compressor("binary", {"activations": True}).compress(tiny_cnn, tiny_digits, quick_context(epochs=2))
    assert res.info["binarised_activations"] == ["relu", "relu_1", "relu_2"]
    ops = export_graph(res.model, tiny_digits.input_shape, res.encodings).graph["ops"]
    assert [op["attrs"]["fn"] for op in ops if op["op"] == "act"] == ["sign"] * 3
    _, out, ref = runtime_error(res.model, res.encodings, tiny_digits, n=128)
    # A pre-activation within float rounding of 0 may take the other sign in numpy: compare
    # decisions, which is what the device is for.
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert np.isclose(out, ref, rtol=1e-4, atol=1e-4).all(1).mean() >= 0.95


def test_sign_activation_gradient_is_straight_through_inside_the_unit_interval() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = SignActivation()(x)
    y.sum().backward()
    assert y.tolist() == [-1, -1, 1, 1, 1]
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_binary_training_recovers_accuracy(tiny_cnn, tiny_digits) -> None:
    untrained = make_compressor("binary", {"epochs": 0}).compress(tiny_cnn, tiny_digits, quick_context())
    trained = make_compressor("binary", {"epochs": 4}).compress(tiny_cnn, tiny_digits, quick_context())
    assert accuracy(trained.model, tiny_digits.X_val, tiny_digits.y_val) > accuracy(untrained.model, tiny_digits.X_val, tiny_digits.y_val)
