"""SparseSep: sparse coding (OMP, dictionary learning), separable convolutions, the sizes it
chooses, and the factorised model end to end (run_pipeline, export, numpy runtime and
onnxruntime against torch, the factored cost in the graph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet._onnx import run_onnx, to_onnx
from deepfleet.compressors import make_compressor, run_pipeline
from deepfleet.compressors._export import export_graph
from deepfleet.compressors._sparsesep import omp, separate, sparse_code
from deepfleet.device_agent.format import sparse_rows
from deepfleet.device_agent.runtime import Model
from deepfleet.errors import ConfigError
from tests.conftest import TinyCNN, TinyGRU, quick_context


def test_omp_with_every_atom_is_the_least_squares_projection() -> None:
    torch.manual_seed(0)
    W = torch.randn(30, 20, dtype=torch.float64)
    A = torch.linalg.qr(torch.randn(20, 8, dtype=torch.float64))[0].T  # 8 orthonormal atoms
    C = omp(W, A, 8)
    np.testing.assert_allclose(C.numpy(), (W @ A.T).numpy(), atol=1e-9)


def test_omp_recovers_sparse_codes_of_an_incoherent_dictionary() -> None:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(12, 64, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True)
    C = torch.zeros(40, 12, dtype=torch.float64)
    for r in range(40):
        idx = torch.randperm(12, generator=g)[:2]
        C[r, idx] = torch.randn(2, generator=g, dtype=torch.float64).sign() * (1 + torch.rand(2, generator=g, dtype=torch.float64))
    got = omp(C @ A, A, 2)
    assert torch.allclose(got, C, atol=1e-8)


def test_sparse_code_keeps_s_nonzeros_per_row_and_learning_never_hurts() -> None:
    torch.manual_seed(2)
    W = torch.randn(50, 10) @ torch.randn(10, 40) + 0.05 * torch.randn(50, 40)  # nearly rank 10
    C0, A0, e0 = sparse_code(W, 10, 3, iterations=0)
    C, A, e = sparse_code(W, 10, 3, iterations=15)
    assert int((C != 0).sum(1).max()) <= 3 and C.shape == (50, 10) and A.shape == (10, 40)
    assert torch.allclose(A.norm(dim=1), torch.ones(10), atol=1e-5)
    assert e <= e0 and e == pytest.approx(float((W - C @ A).norm() / W.norm()), rel=1e-4)
    _, _, full = sparse_code(W, 10, 10, iterations=0)  # no sparsity: the rank-10 SVD error
    assert full < 0.05


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 0, 1), ((2, 1), (1, 2), 1), (1, 1, 2)])
def test_separable_pair_at_full_rank_is_the_convolution(stride, padding, dilation) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 7, (3, 5), stride=stride, padding=padding, dilation=dilation)
    pair = separate(conv, min(3 * 3, 7 * 5))
    x = torch.randn(2, 3, 12, 13)
    with torch.no_grad():
        assert pair(x).shape == conv(x).shape
        assert torch.allclose(pair(x), conv(x), atol=1e-5)
    assert [m.kernel_size for m in pair] == [(3, 1), (1, 5)]


def _noise(shape: tuple[int, ...], n: int = 96):
    from deepfleet.data import Dataset

    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, *shape)).astype(np.float32)
    y = np.arange(n) % 4
    t = n // 3
    return Dataset(name="noise", X_train=X[:t], y_train=y[:t], X_val=X[t:2 * t], y_val=y[t:2 * t],
                   X_test=X[2 * t:], y_test=y[2 * t:], num_classes=4, fingerprint="noise")


@pytest.mark.parametrize(("model", "shape"), [(TinyCNN(4), (1, 28, 28)), (TinyGRU(), (6, 12))], ids=["cnn", "gru"])
def test_sparsesep_end_to_end_runs_at_the_factored_cost(model: nn.Module, shape: tuple[int, ...]) -> None:
    data = _noise(shape)
    model = model.eval()
    before = sum(p.numel() for p in model.parameters())
    res = run_pipeline(model, data, [make_compressor("sparsesep", {"target": 0.3, "iterations": 2})],
                       ctx=quick_context())
    kept = res.kept_params(before)
    assert 0.05 < kept <= 0.31  # the sizes are chosen to meet the target
    info = res.steps[0]["info"]
    linear = [r for r in info["layers"] if r["kind"] == "linear" and r["factorised"]]
    assert linear and all(r["nonzeros_per_code"] <= r["atoms"] for r in linear)
    ex = export_graph(res.model, data.input_shape, res.encodings)
    ops = [o["op"] for o in ex.graph["ops"]]
    assert ops.count("sparse_linear") == len(linear)
    for op in ex.graph["ops"]:
        if op["op"] == "sparse_linear":  # the codes are stored sparse, never as a dense matrix
            spec = ex.graph["tensors"][op["weights"]["weight"]]
            assert spec["encoding"] == "sparse"
            index, values = sparse_rows(op["weights"]["weight"], spec, ex.arrays)
            assert index.shape[1] <= max(r["nonzeros_per_code"] for r in linear)
    dense = export_graph(model, data.input_shape)
    assert ex.macs < dense.macs
    x = data.X_test
    with torch.no_grad():
        ref = res.model(torch.as_tensor(x)).numpy()
    for out in (Model(ex.graph, ex.arrays).run(x), run_onnx(to_onnx(ex.graph, ex.arrays).data, x)[0]):
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
        assert (out.argmax(1) == ref.argmax(1)).all()
    if isinstance(model, TinyGRU):  # recurrent matrices stored factored (decoded when loaded)
        kinds = {k: v["encoding"] for k, v in ex.graph["tensors"].items() if ".l" in k and "_w_" in k}
        assert kinds and set(kinds.values()) == {"factored"}


def test_recurrent_false_leaves_recurrent_matrices_dense() -> None:
    data = _noise((6, 12))
    res = run_pipeline(TinyGRU().eval(), data, [make_compressor(
        "sparsesep", {"target": 0.5, "recurrent": False, "iterations": 1, "epochs": 0})], ctx=quick_context())
    assert not any(n.startswith("gru.") for n in res.encodings)
    assert all(r["kind"] != "recurrent" for r in res.steps[0]["info"]["layers"])


def test_given_dictionary_size_and_rank_override_the_target() -> None:
    data = _noise((1, 28, 28))
    res = run_pipeline(TinyCNN(4).eval(), data, [make_compressor(
        "sparsesep", {"atoms": 0.5, "sparsity": 0.5, "rank": 0.4, "iterations": 0, "epochs": 0})],
        ctx=quick_context())
    rows = {r["name"]: r for r in res.steps[0]["info"]["layers"]}
    assert rows["fc1"]["atoms"] == 12 and rows["fc1"]["nonzeros_per_code"] == 6  # 0.5 of min(24, 128)
    assert rows["conv2"]["rank"] == round(0.4 * min(6 * 5, 8 * 5))
    assert res.steps[0]["info"]["energy"] is None


@pytest.mark.parametrize(("settings", "needle"), [
    ({"atoms": 0}, "sparsesep: atoms must be in (0, 1], but got 0"),
    ({"atoms": 1.5}, "sparsesep: atoms must be in (0, 1], but got 1.5"),
    ({"sparsity": 0}, "sparsesep: sparsity must be in (0, 1], but got 0"),
    ({"rank": -0.2}, "sparsesep: rank must be in (0, 1], but got -0.2"),
    ({"iterations": -1}, "sparsesep: iterations must be a whole number in 0..1000, but got -1"),
    ({"recurrent": "yes"}, "sparsesep: recurrent must be true or false, but got 'yes'"),
])
def test_settings_out_of_range_are_one_error_naming_key_value_and_range(settings: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_compressor("sparsesep", settings)
    assert str(err.value) == needle
