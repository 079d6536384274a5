"""Codebook quantisers: k-means, product and residual quantisation, and bit-packed indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfleet.compressors import make_compressor, run_pipeline
from deepfleet.compressors._codebook import kmeans, kmeans_1d
from deepfleet.compressors._encoding import pack_codes
from deepfleet.device_agent.format import _ints
from tests.conftest import quick_context, runtime_error


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_packed_codes_round_trip_through_the_runtime(bits: int, signed: bool) -> None:
    rng = np.random.default_rng(bits)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = rng.integers(low, high + 1, size=37)
    arr, attrs = pack_codes(codes, bits)
    assert arr.nbytes == (-(-37 * bits // 8) if bits < 8 else 37)
    assert np.array_equal(_ints({"c": "c", **attrs}, {"c": arr}, "c", count=37, signed=signed), codes)


def test_every_encoding_the_compressors_write_is_one_the_agent_decodes() -> None:
    from deepfleet.compressors._encoding import ARRAY_ROLES
    from deepfleet.device_agent.format import ENCODINGS, ArtifactCorrupt, decode_tensor

    assert set(ARRAY_ROLES) <= set(ENCODINGS)
    with pytest.raises(ArtifactCorrupt, match="unknown encoding 'zstd': update the agent"):
        decode_tensor("w", {"encoding": "zstd", "shape": [1]}, {})


def test_kmeans_1d_finds_well_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([-1.0, -0.2, 0.3, 2.0])
    x = np.concatenate([c + 0.01 * rng.normal(size=50) for c in centres])
    c, idx = kmeans_1d(x, 4, 50)
    assert np.allclose(c, centres, atol=0.01)
    assert np.array_equal(idx, np.repeat(np.arange(4), 50))


def test_vector_kmeans_recovers_centres_and_handles_fewer_points_than_centroids() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    pts = torch.cat([c + 0.05 * torch.randn(40, 2, generator=g) for c in centres])
    book, idx = kmeans(pts, 3, 30, generator=g)
    assert torch.allclose(book[idx], pts, atol=0.3)
    book, idx = kmeans(pts[:2], 4, 5, generator=g)
    assert torch.equal(book[idx], pts[:2])  # each point is its own centroid


@pytest.mark.parametrize(("method", "settings"), [("kmeans", {"bits": 3}), ("pq", {"bits": 3, "dim": 3}),
                                                  ("rq", {"bits": 2, "dim": 2, "stages": 3})])
def test_indices_and_codebooks_encode_the_weights_and_the_runtime_reproduces_torch(tiny_case, method, settings) -> None:
    model, data = tiny_case
    res = make_compressor(method, settings).compress(model, data, quick_context())
    params = dict(res.model.named_parameters())
    k = 2 ** settings["bits"]
    for name, enc in res.encodings.items():
        idx = _ints({"i": "i", **enc.attrs}, {"i": enc.arrays["indices"]}, "i",
                    count=enc.arrays["indices"].size * 8 // settings["bits"], signed=False)
        assert idx.min() >= 0 and idx.max() < k
        book = enc.arrays["codebook" if method == "kmeans" else "codebooks"]
        assert book.dtype == np.float32 and book.shape[-2 if method != "kmeans" else 0] == k
        assert np.array_equal(enc.decode(), params[name].detach().numpy())
        if method == "kmeans":
            assert len(np.unique(params[name].detach().numpy())) <= k
    err, _, _ = runtime_error(res.model, res.encodings, data)
    assert err < 1e-5


def test_kmeans_after_magnitude_pruning_keeps_the_zeros(tiny_cnn, tiny_digits) -> None:
    pruner = make_compressor("magnitude", {"target": 0.3, "steps": 1})
    res = run_pipeline(tiny_cnn, tiny_digits, [pruner, make_compressor("kmeans", {"bits": 2})], ctx=quick_context())
    before = dict(tiny_cnn.named_parameters())
    after = dict(res.model.named_parameters())
    zeros = sum(int((after[n] == 0).sum()) for n in res.encodings)
    total = sum(after[n].numel() for n in res.encodings)
    assert zeros >= 0.69 * total  # the pruned 70 % stay exactly zero
    for n, enc in res.encodings.items():
        assert enc.arrays["codebook"][0] == 0.0  # the pinned centroid
        assert before[n].shape == after[n].shape


def test_fine_tuning_moves_centroids_not_indices(tiny_cnn, tiny_digits) -> None:
    frozen = make_compressor("kmeans", {"bits": 2, "finetune": False}).compress(tiny_cnn, tiny_digits, quick_context())
    tuned = make_compressor("kmeans", {"bits": 2}).compress(tiny_cnn, tiny_digits, quick_context(epochs=2))
    a, b = frozen.encodings["fc1.weight"], tuned.encodings["fc1.weight"]
    assert np.array_equal(a.arrays["indices"], b.arrays["indices"])
    assert not np.array_equal(a.arrays["codebook"], b.arrays["codebook"])
