"""The ``sparse`` and ``factored`` tensor encodings and the ``sparse_linear`` / ``temperature``
ops: exact decoding by the device library, bytes that shrink with sparsity, and the ops against
torch (the oracle) in the numpy runtime and onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepfleet._onnx import run_onnx, to_onnx
from deepfleet.compressors._encoding import (
    Encoding,
    _index_codes,
    float32_encoding,
    pack_codes,
    sparse_encoding,
)
from deepfleet.device_agent.format import ENCODINGS, _sparse_positions, decode_tensor, sparse_rows
from deepfleet.device_agent.runtime import OPS, Model


def _sparse_matrix(shape: tuple[int, ...], density: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0.0
    return w


def _decode(enc: Encoding, name: str = "w") -> np.ndarray:
    entry, arrays = enc.spec(name)
    return decode_tensor(name, entry, arrays)


def test_the_new_encodings_are_listed() -> None:
    assert {"sparse", "factored"} <= set(ENCODINGS)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(37, 53), (4, 3, 5, 5), (1000,)])
def test_sparse_round_trip_is_exact(shape: tuple[int, ...], density: float) -> None:
    w = _sparse_matrix(shape, density)
    enc = sparse_encoding(w)
    assert enc is not None and enc.kind == "sparse" and enc.stored == np.count_nonzero(w)
    back = _decode(enc)
    assert back.dtype == np.float32 and back.shape == w.shape
    assert np.array_equal(back, w)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 16])
def test_relative_indices_with_long_gaps_need_skip_codes(bits: int) -> None:
    positions = np.array([0, 1, 2, 300, 301, 5000, 70000])
    gaps = np.diff(np.concatenate(([-1], positions)))
    codes = _index_codes(gaps, bits)
    top = (1 << bits) - 1
    assert codes.max() <= top and (codes == 0).sum() == ((gaps - 1) // top).sum()
    packed, attrs = pack_codes(codes, bits) if bits < 8 else (codes.astype(np.uint8 if bits == 8 else np.uint16), {})
    spec = {"index": "i", "count": int(codes.size), "index_bits": bits, **attrs}
    assert np.array_equal(_sparse_positions(spec, {"i": packed}), positions)


def test_bytes_shrink_with_sparsity_and_beat_dense_storage_once_sparse_enough() -> None:
    sizes = [sparse_encoding(_sparse_matrix((500, 400), d)).nbytes for d in (0.5, 0.2, 0.05, 0.01)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    dense = 500 * 400 * 4
    assert sizes[0] > dense * 0.5  # 4-byte values + indices: no gain at half density
    assert sizes[2] < dense * 0.07 and sizes[3] < dense * 0.015  # ~5 bytes per kept weight


def test_sparse_wraps_elementwise_codes_of_a_quantiser_exactly() -> None:
    w = _sparse_matrix((64, 48), 0.1, seed=1)
    codes = np.clip(np.round(w * 16), -32, 31).astype(np.int64)  # 6-bit signed codes
    q = codes.astype(np.float32) / 16  # the fixed-point values a quantiser would keep
    packed, attrs = pack_codes(codes, 6)
    fixed = Encoding(kind="fixed", shape=w.shape, arrays={"codes": packed}, attrs={"frac_bits": 4, **attrs}, bits=6)
    assert np.array_equal(_decode(fixed), q)
    enc = sparse_encoding(q, fixed)
    assert enc is not None and enc.parts["values"].kind == "fixed"
    assert np.array_equal(_decode(enc), q)
    assert enc.nbytes < fixed.nbytes  # 10 % kept: 6-bit codes + small indices beat 6 bits everywhere


def test_sparse_rows_gives_each_rows_nonzeros_without_the_dense_matrix() -> None:
    w = _sparse_matrix((20, 30), 0.15, seed=2)
    w[3] = 0.0  # an empty row: padded with value 0
    entry, arrays = sparse_encoding(w).spec("w")
    index, values = sparse_rows("w", entry, arrays)
    assert index.shape == values.shape and index.shape[0] == 20
    assert index.shape[1] == max(1, int((w != 0).sum(1).max()))
    dense = np.zeros_like(w)
    for r in range(20):
        np.add.at(dense[r], index[r], values[r])
    assert np.array_equal(dense, w)
    assert not values[3].any()
    # a float32 (dense) entry gives the same rows
    i2, v2 = sparse_rows("d", {"encoding": "float32", "shape": [20, 30]}, {"d": w})
    assert np.array_equal(i2, index) and np.array_equal(v2, values)


def test_factored_decodes_codes_times_atoms_in_a_fixed_order() -> None:
    rng = np.random.default_rng(3)
    A = rng.normal(size=(6, 40)).astype(np.float32)
    C = _sparse_matrix((25, 6), 0.4, seed=4)
    codes = sparse_encoding(C)
    assert codes is not None
    enc = Encoding(kind="factored", shape=(25, 40), arrays={}, parts={"atoms": float32_encoding(A), "codes": codes})
    got = _decode(enc)
    assert got.dtype == np.float32 and got.shape == (25, 40)
    np.testing.assert_allclose(got, C @ A, rtol=1e-5, atol=1e-6)
    expected = np.zeros((25, 40), np.float32)  # the definition: row by row, codes in column order
    for r in range(25):
        for j in np.flatnonzero(C[r]):
            expected[r] += C[r, j] * A[j]
    assert np.array_equal(got, expected)


def _graph(ops: list[dict], tensors: dict, outputs: list[str], shape: list[int]) -> dict:
    return {"format": "deepfleet-graph", "version": 1, "input": {"name": "x", "shape": shape, "dtype": "float32"},
            "outputs": outputs, "ops": ops, "tensors": tensors}


@pytest.mark.parametrize("leading", [(), (3,)])
def test_sparse_linear_op_matches_torch_in_numpy_and_onnxruntime(leading: tuple[int, ...]) -> None:
    W = _sparse_matrix((7, 11), 0.3, seed=5)
    b = np.arange(7, dtype=np.float32) / 10
    entry, arrays = sparse_encoding(W).spec("fc.weight")
    arrays["fc.bias"] = b
    graph = _graph([{"name": "fc", "op": "sparse_linear", "inputs": ["x"],
                     "weights": {"weight": "fc.weight", "bias": "fc.bias"}}],
                   {"fc.weight": entry, "fc.bias": {"encoding": "float32", "shape": [7]}}, ["fc"], [*leading, 11])
    x = np.random.default_rng(6).normal(size=(4, *leading, 11)).astype(np.float32)
    ref = F.linear(torch.as_tensor(x), torch.as_tensor(W), torch.as_tensor(b)).numpy()
    np.testing.assert_allclose(Model(graph, arrays).run(x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run_onnx(to_onnx(graph, arrays).data, x)[0], ref, rtol=1e-5, atol=1e-6)


def test_temperature_op_divides_exactly_as_torch_in_numpy_and_onnxruntime() -> None:
    from deepfleet.compressors._calibrate import TemperatureScale

    t = float(np.float32(1.7))
    graph = _graph([{"name": "t", "op": "temperature", "inputs": ["x"], "attrs": {"value": t}}], {}, ["t"], [5])
    x = np.random.default_rng(7).normal(size=(9, 5)).astype(np.float32) * 10
    ref = TemperatureScale(t)(torch.as_tensor(x)).numpy()
    assert np.array_equal(Model(graph, {}).run(x), ref)
    assert np.array_equal(run_onnx(to_onnx(graph, {}).data, x)[0], ref)
    assert "temperature" in OPS and "sparse_linear" in OPS
