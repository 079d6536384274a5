from __future__ import annotations

import pytest
import torch

from deepfleet.compressors._cost import cost, cost_model, full_keep, kept_fraction
from deepfleet.compressors._extract import StackedRNN, check_extraction, extract
from deepfleet.compressors._graph import analyse
from deepfleet.compressors._masked import masked_model
from deepfleet.errors import ModelError
from tests.conftest import random_keep


@pytest.mark.parametrize("fraction", [0.3, 0.8])
def test_extracted_model_equals_masked_model(zoo_model, fraction: float) -> None:
    name, model, shape = zoo_model
    x = torch.randn(5, *shape)
    st = analyse(model, x[:2])
    masked, state = masked_model(st)
    keep = random_keep([g.size for g in st.groups], fraction, seed=3)
    small = extract(st, masked, keep)
    masks = [torch.as_tensor(k, dtype=torch.float32) for k in keep]
    err = check_extraction(masked, lambda: state.set(masks), small, x, tol=1e-5)
    assert err < 1e-5
    # the masked model really differs from the original: the test would notice a no-op mask
    state.set(masks)
    assert not torch.allclose(masked(x), model(x), atol=1e-4)


def test_cost_model_counts_the_extracted_parameters_exactly(zoo_model) -> None:
    name, model, shape = zoo_model
    st = analyse(model, torch.randn(2, *shape))
    cm = cost_model(st)
    assert int(cost(cm, full_keep(cm))[0]) == sum(p.numel() for p in model.parameters())
    keep = random_keep([g.size for g in st.groups], 0.4, seed=1)
    small = extract(st, st.graph_module, keep)
    params, _ = cost(cm, [torch.as_tensor(k, dtype=torch.float64) for k in keep])
    assert int(params) == sum(p.numel() for p in small.parameters())


def test_expected_cost_matches_the_mean_of_sampled_costs() -> None:
    from deepfleet.models import build_model

    model = build_model("bilstm", input_shape=(4, 6), num_classes=3)
    st = analyse(model, torch.randn(2, 4, 6))
    cm = cost_model(st)
    g = torch.Generator().manual_seed(0)
    probs = [torch.rand(gr.size, generator=g, dtype=torch.float64) for gr in st.groups]
    samples = [torch.bernoulli(p.expand(4000, -1), generator=g) for p in probs]
    sampled = kept_fraction(cm, samples, "params").mean()
    expected = kept_fraction(cm, probs, "params", expected=True)
    assert abs(float(sampled) - float(expected)) < 0.01


def test_stacked_rnn_layers_of_different_widths_become_a_stackedrnn() -> None:
    from deepfleet.models import build_model

    model = build_model("deepsense", input_shape=(6, 10), num_classes=6).eval()
    st = analyse(model, torch.randn(2, 6, 10))
    keep = [torch.ones(g.size, dtype=torch.bool).numpy() for g in st.groups]
    keep[-2][5:] = False  # gru.l0 keeps 5, gru.l1 keeps all 64
    small = extract(st, st.graph_module, keep)
    assert isinstance(small.get_submodule("gru"), StackedRNN)
    keep[-1][5:] = False  # both keep 5: one plain nn.GRU again
    small = extract(st, st.graph_module, keep)
    assert isinstance(small.get_submodule("gru"), torch.nn.GRU)
    assert small.get_submodule("gru").hidden_size == 5


def test_every_group_must_keep_a_unit() -> None:
    from deepfleet.models import build_model

    model = build_model("mlp", input_shape=(1, 4, 4), num_classes=3)
    st = analyse(model, torch.randn(2, 1, 4, 4))
    keep = [torch.ones(g.size, dtype=torch.bool).numpy() for g in st.groups]
    keep[0][:] = False
    with pytest.raises(ValueError, match="keeps no unit"):
        extract(st, st.graph_module, keep)


class _Fails(torch.nn.Module):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.error == "view":
            return x.view(-1, 800)  # a size written into forward(): cannot follow a smaller model
        raise RuntimeError(self.error)


def test_an_extracted_model_that_cannot_run_gets_the_fix_for_its_cause() -> None:
    masked = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    with pytest.raises(ModelError, match=r"invalid for input of size.*hard-coded sizes.*torch\.flatten"):
        check_extraction(masked, lambda: None, _Fails("view"), x)
    with pytest.raises(ModelError, match="same device.*please report it") as info:
        check_extraction(masked, lambda: None, _Fails("Expected all tensors to be on the same device"), x)
    assert "hard-coded" not in str(info.value)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_masked_rnn_is_the_module_with_dropped_units_exactly_zero(kind: str) -> None:
    from deepfleet.compressors._masked import masked_rnn

    torch.manual_seed(0)
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    rnn = cls(5, 7, num_layers=2, bidirectional=True, batch_first=False)
    x = torch.randn(9, 4, 5)  # (T, B, C)
    ones = [torch.ones(7), torch.ones(7)]
    out, _ = masked_rnn(rnn, x, ones)
    assert torch.allclose(out, rnn(x)[0], atol=1e-6)  # all kept: the module itself
    z = [torch.bernoulli(torch.full((4, 7), 0.5)) for _ in range(2)]
    out, hidden = masked_rnn(rnn, x, z)
    h_n = hidden[0] if kind == "lstm" else hidden
    dropped = (z[1] == 0)[None].expand(9, -1, -1)
    assert torch.equal(out[..., :7][dropped], torch.zeros(int(dropped.sum())))  # exactly 0
    assert torch.equal(h_n[2][z[1] == 0], torch.zeros(int((z[1] == 0).sum())))
    out.sum().backward()
    assert rnn.weight_hh_l0.grad is not None and torch.isfinite(rnn.weight_hh_l0.grad).all()
