"""Fixed point <IL, FL>: rounding, saturation, codes, activations, bytes, and the runtime oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfleet.artifact import write_artifact
from deepfleet.compressors import (
    FixedPoint,
    FixedPointConfig,
    QuantAct,
    export_graph,
    make_compressor,
)
from deepfleet.compressors._fixedpoint import code_range, int_bits_for, quantise
from deepfleet.device_agent.runtime import Model
from deepfleet.errors import ConfigError
from tests.conftest import quick_context, runtime_error


@pytest.mark.parametrize(
    ("max_abs", "signed", "il"),
    [(0.5, True, 0), (0.51, True, 1), (0.24, True, -1), (3.0, True, 3), (1.0, False, 0), (5.0, False, 3)],
)
def test_int_bits_cover_the_observed_range_with_the_fewest_bits(max_abs: float, signed: bool, il: int) -> None:
    assert int_bits_for(max_abs, signed) == il
    top = 2.0 ** (il - 1 if signed else il)
    assert top >= max_abs > top / 2  # covered, and one bit fewer would not cover it


def test_nearest_rounds_ties_to_even_and_saturates_at_both_ends() -> None:
    # <IL=2, FL=2> in 4 bits: codes -8..7, values -2.0 .. 1.75 in steps of 0.25
    x = torch.tensor([0.125, 0.375, -0.125, 0.3, 1.74, 1.9, 5.0, -2.0, -2.2, -100.0])
    codes = quantise(x, 4, 2)
    assert codes.tolist() == [0, 2, 0, 1, 7, 7, 7, -8, -8, -8]
    assert torch.equal(quantise(x, 4, 2), codes)  # deterministic


def test_stochastic_rounding_is_unbiased_and_only_picks_the_two_neighbours() -> None:
    x = torch.tensor([0.1, 0.3, -0.6, 1.05, 0.0, 1.7])  # in units of 2^-FL with FL = 3 below
    draws = torch.stack([quantise(x, 8, 3, rounding="stochastic", generator=torch.Generator().manual_seed(s)) for s in range(4000)])
    scaled = x * 8
    assert ((draws == scaled.floor()) | (draws == scaled.ceil())).all()
    mean = draws.mean(0)
    # standard error of the mean is at most 0.5 / sqrt(4000) ~ 0.008 codes
    assert torch.allclose(mean, scaled, atol=0.04), (mean, scaled)
    assert draws[:, 4].eq(0).all()  # exact values never move


def test_stochastic_rounding_saturates_too() -> None:
    x = torch.full((1000,), 3.0)
    codes = quantise(x, 4, 2, rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert codes.eq(code_range(4)[1]).all()


def test_quant_act_matches_the_runtime_op_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, generator=g) * 3, torch.arange(-40, 40) / 8.0 + 1 / 16])  # ties included
    for signed in (True, False):
        q = QuantAct(6, 3, signed).eval()
        with torch.no_grad():
            ref = q(x).numpy()
        graph = {"format": "deepfleet-graph", "version": 1, "input": {"name": "x", "shape": [], "dtype": "float32"},
                 "outputs": ["q"], "ops": [{"name": "q", "op": "fake_quant", "inputs": ["x"],
                                            "attrs": {"bits": 6, "frac_bits": 3, "signed": signed}}], "tensors": {}}
        out = Model(graph, {}).run(x.numpy())
        assert np.array_equal(out, ref)
        low, high = code_range(6, signed)
        assert ref.min() >= low / 8 and ref.max() <= high / 8 and (ref.max() == high / 8)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_codes_are_integers_in_range_and_decode_to_the_model_weights(tiny_cnn, tiny_digits, bits: int) -> None:
    res = FixedPoint(FixedPointConfig(bits=bits, training="none")).compress(tiny_cnn, tiny_digits, quick_context())
    params = dict(res.model.named_parameters())
    assert set(res.encodings) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert "bn1" not in dict(res.model.named_modules())  # folded before quantising
    low, high = code_range(bits)
    for name, enc in res.encodings.items():
        assert enc.kind == "fixed"
        w = params[name].detach().numpy()
        codes = w * 2.0 ** enc.attrs["frac_bits"]
        assert np.array_equal(codes, np.round(codes)) and codes.min() >= low and codes.max() <= high
        assert np.array_equal(enc.decode(), w)  # the device decodes exactly these weights
        if bits == 8:
            assert enc.arrays["codes"].dtype == np.int8
        else:
            assert enc.attrs["packed"] == bits and enc.arrays["codes"].nbytes == -(-w.size * bits // 8)


def test_weights_saturate_when_int_bits_are_given_too_small(tiny_cnn, tiny_digits) -> None:
    res = FixedPoint(FixedPointConfig(bits=8, int_bits=-3, training="none")).compress(tiny_cnn, tiny_digits, quick_context())
    w = dict(res.model.named_parameters())["fc1.weight"].detach()
    assert float(tiny_cnn.fc1.weight.detach().abs().max()) > 1 / 16
    assert w.max() == (127 / 2**11) and w.min() == -(128 / 2**11)  # <IL=-3, FL=11>: |w| <= 1/16
    fc1 = next(r for r in res.info["layers"] if r["weight"] == "fc1.weight")
    assert fc1["int_bits"] == -3 and fc1["saturated"] > 0


def test_runtime_reproduces_fixed_point_with_activation_quantisation(tiny_case) -> None:
    model, data = tiny_case
    res = make_compressor("fixedpoint", {"bits": 6, "act_bits": 8}).compress(model, data, quick_context())
    assert res.info["activations"] and all(a["bits"] == 8 for a in res.info["activations"])
    ops = [op["op"] for op in export_graph(res.model, data.input_shape, res.encodings).graph["ops"]]
    assert ops.count("fake_quant") == len(res.info["activations"])
    err, _, _ = runtime_error(res.model, res.encodings, data)
    assert err < 1e-5


def test_artifact_bytes_shrink_with_bits(tmp_path, tiny_cnn, tiny_digits) -> None:
    sizes, on_disk = {}, {}
    for bits in (16, 8, 4, 2):
        res = FixedPoint(FixedPointConfig(bits=bits, training="none")).compress(tiny_cnn, tiny_digits, quick_context())
        ex = export_graph(res.model, tiny_digits.input_shape, res.encodings)
        sizes[bits] = sum(a.nbytes for n, a in ex.arrays.items() if n.endswith(".codes"))
        on_disk[bits] = write_artifact(tmp_path / str(bits), ex.graph, ex.arrays, {}).bytes
    float_bytes = 4 * sum(p.numel() for n, p in tiny_cnn.named_parameters() if n.endswith("weight") and "bn" not in n)
    for bits, size in sizes.items():
        assert size == pytest.approx(float_bytes * bits / 32, abs=8)  # codes: bits / 32 of float32
    # the artifact's three files (model.onnx beside them holds decoded floats below 8 bits)
    assert list(on_disk.values()) == sorted(on_disk.values(), reverse=True) and on_disk[2] < on_disk[16]


def test_low_precision_training_keeps_weights_on_the_grid(tiny_cnn, tiny_digits) -> None:
    cfg = FixedPointConfig(bits=6, training="low-precision", rounding="stochastic")
    res = FixedPoint(cfg).compress(tiny_cnn, tiny_digits, quick_context(epochs=2))
    assert res.info["epochs_trained"] == 2
    for name, enc in res.encodings.items():
        w = dict(res.model.named_parameters())[name].detach().numpy()
        assert np.array_equal(w * 2.0 ** enc.attrs["frac_bits"], np.round(w * 2.0 ** enc.attrs["frac_bits"]))


def test_quantisation_aware_training_improves_on_post_training_at_low_bits(tiny_cnn, tiny_digits) -> None:
    from deepfleet.compressors.training import accuracy

    ptq = FixedPoint(FixedPointConfig(bits=2, training="none")).compress(tiny_cnn, tiny_digits, quick_context())
    qat = FixedPoint(FixedPointConfig(bits=2, training="ste")).compress(tiny_cnn, tiny_digits, quick_context(epochs=3))
    # validation decides the kept epoch, so QAT can never end below post-training quantisation
    assert accuracy(qat.model, tiny_digits.X_val, tiny_digits.y_val) >= accuracy(ptq.model, tiny_digits.X_val, tiny_digits.y_val)
    assert not torch.equal(dict(qat.model.named_parameters())["fc1.weight"], dict(ptq.model.named_parameters())["fc1.weight"])


@pytest.mark.parametrize(
    ("settings", "needle"),
    [({"bits": 1}, "fixedpoint supports bits in 2..16, but got 1"),
     ({"bits": 17}, "but got 17"),
     ({"rounding": "up"}, "rounding must be one of 'nearest', 'stochastic', but got 'up'"),
     ({"act_bits": 40}, "act_bits in 2..16"),
     ({"training": "qat"}, "training must be one of"),
     ({"bitz": 8}, "unknown setting(s) bitz; accepted: bits")],
)
def test_bad_settings_are_refused_with_the_accepted_values(settings: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_compressor("fixedpoint", settings)
    assert needle in str(err.value)


def test_unknown_layer_in_per_layer_bits_is_named(tiny_cnn, tiny_digits) -> None:
    with pytest.raises(ConfigError, match="'fc9'.*it has: conv1"):
        FixedPoint(FixedPointConfig(layer_bits={"fc9": 4})).compress(tiny_cnn, tiny_digits, quick_context())


def test_per_layer_bits(tiny_cnn, tiny_digits) -> None:
    res = FixedPoint(FixedPointConfig(bits=8, layer_bits={"fc1": 3}, training="none")).compress(
        tiny_cnn, tiny_digits, quick_context())
    bits = {r["weight"]: r["bits"] for r in res.info["layers"]}
    assert bits == {"conv1.weight": 8, "conv2.weight": 8, "fc1.weight": 3, "fc2.weight": 8}
    assert res.encodings["fc1.weight"].attrs["packed"] == 3
