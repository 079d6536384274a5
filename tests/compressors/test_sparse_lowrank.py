"""Magnitude pruning, dynamic network surgery and SVD low-rank factorisation."""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.compressors import LowRankConfig, export_graph, make_compressor
from deepfleet.compressors._finetune import weight_names
from deepfleet.compressors._lowrank import factorise
from tests.conftest import quick_context, runtime_error


def _kept(model: nn.Module) -> float:
    params = dict(model.named_parameters())
    names = weight_names(model)
    return sum(int((params[n] != 0).sum()) for n in names) / sum(params[n].numel() for n in names)


def test_magnitude_pruning_keeps_the_target_fraction_through_retraining(tiny_case) -> None:
    model, data = tiny_case
    res = make_compressor("magnitude", {"target": 0.2, "steps": 2}).compress(model, data, quick_context())
    assert abs(_kept(res.model) - 0.2) < 0.002
    assert res.info["kept_weights"] == _kept(res.model)
    assert _kept(model) == 1.0  # the input model is left alone
    err, _, _ = runtime_error(res.model, {}, data)
    assert err < 1e-5


def test_dynamic_network_surgery_reaches_the_target_and_splices_weights_back(tiny_cnn, tiny_digits) -> None:
    dns = make_compressor("dns", {"target": 0.15, "update_every": 2, "anneal": 0.5})
    res = dns.compress(tiny_cnn, tiny_digits, quick_context(epochs=4))
    assert 0.13 < _kept(res.model) <= 0.15 + 1e-3
    # splicing: some weights pruned by one-shot magnitude at the target are alive after surgery
    one_shot = make_compressor("magnitude", {"target": 0.15, "steps": 1, "epochs": 0}).compress(
        tiny_cnn, tiny_digits, quick_context())
    revived = sum(int(((dict(one_shot.model.named_parameters())[n] == 0)
                       & (dict(res.model.named_parameters())[n] != 0)).sum()) for n in weight_names(res.model))
    assert revived > 0


def test_factorisation_at_full_rank_is_exact_for_linear_and_conv() -> None:
    torch.manual_seed(0)
    for layer, x in ((nn.Linear(12, 7), torch.randn(3, 12)), (nn.Conv2d(3, 5, 3, padding=1, stride=2), torch.randn(2, 3, 9, 9)),
                     (nn.Conv1d(4, 6, 3, dilation=2), torch.randn(2, 4, 11))):
        full = min(layer.weight.shape[0], layer.weight[0].numel())
        with torch.no_grad():
            assert torch.allclose(factorise(layer, full)(x), layer(x), atol=1e-5)


def test_low_rank_becomes_two_layers_in_the_graph_and_the_runtime_reproduces_it(tiny_cnn, tiny_digits) -> None:
    res = make_compressor("lowrank", {"params": 0.4}).compress(tiny_cnn, tiny_digits, quick_context())
    fc1 = next(r for r in res.info["layers"] if r["name"] == "fc1")
    assert fc1["factorised"] and fc1["weights_after"] <= 0.4 * fc1["weights_before"]
    assert isinstance(res.model.fc1, nn.Sequential) and res.model.fc1[0].out_features == fc1["rank"]
    ops = [op["name"] for op in export_graph(res.model, tiny_digits.input_shape).graph["ops"] if op["op"] == "linear"]
    expected = [n for r in res.info["layers"] if r["kind"] == "linear"
                for n in ([f"{r['name']}_0", f"{r['name']}_1"] if r["factorised"] else [r["name"]])]
    assert ops == expected and ops[:2] == ["fc1_0", "fc1_1"]
    err, _, _ = runtime_error(res.model, {}, tiny_digits)
    assert err < 1e-5


def test_rank_by_energy() -> None:
    from deepfleet.compressors._lowrank import choose_rank

    s = torch.tensor([3.0, 2.0, 1.0, 0.1])  # energies 9, 4, 1, 0.01
    assert choose_rank(s, (10, 10), LowRankConfig(energy=0.6)) == 1
    assert choose_rank(s, (10, 10), LowRankConfig(energy=0.9)) == 2
    assert choose_rank(s, (10, 10), LowRankConfig(energy=0.999)) == 3
    assert choose_rank(s, (10, 10), LowRankConfig(params=0.5)) == 2
    assert choose_rank(s, (10, 10), LowRankConfig()) == choose_rank(s, (10, 10), LowRankConfig(energy=0.9))
