"""The numpy runtime's conv and pooling against PyTorch over a grid of shapes and settings.

These two ops dominate small models' latency, so they are written for speed (one im2col matmul;
pools folded over strided slices); the grid pins that they still compute exactly what torch does.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepfleet.device_agent import runtime

GRID = [(nd, k, s, p, d, ceil)
        for nd, k, s, p, d, ceil in itertools.product((1, 2), (1, 2, 3), (1, 2, 3), (0, 1), (1, 2),
                                                      (False, True))
        if p <= k // 2]


@pytest.mark.parametrize("nd", [1, 2])
def test_max_pool_matches_torch(nd: int) -> None:
    rng = np.random.default_rng(nd)
    pool = F.max_pool1d if nd == 1 else F.max_pool2d
    for _, k, s, p, d, ceil in (g for g in GRID if g[0] == nd):
        x = rng.standard_normal((2, 3) + (11,) * nd).astype(np.float32)
        want = pool(torch.from_numpy(x), k, stride=s, padding=p, dilation=d, ceil_mode=ceil)
        got = runtime.op_max_pool([x], {"kernel": [k] * nd, "stride": [s] * nd,
                                      "padding": [p] * nd, "dilation": [d] * nd,
                                      "ceil_mode": ceil}, {})
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.numpy(), err_msg=str((nd, k, s, p, d, ceil)))


@pytest.mark.parametrize("nd", [1, 2])
def test_avg_pool_matches_torch(nd: int) -> None:
    rng = np.random.default_rng(10 + nd)
    pool = F.avg_pool1d if nd == 1 else F.avg_pool2d
    # ceil_mode is left out: torch divides a window that ends past the input by a clipped size.
    for _, k, s, p, _d, _ in (g for g in GRID if g[0] == nd and g[4] == 1 and not g[5]):
        for include_pad in (True, False):
            x = rng.standard_normal((2, 3) + (10,) * nd).astype(np.float32)
            want = pool(torch.from_numpy(x), k, stride=s, padding=p,
                        count_include_pad=include_pad)
            got = runtime.op_avg_pool([x], {"kernel": [k] * nd, "stride": [s] * nd,
                                          "padding": [p] * nd, "count_include_pad": include_pad},
                                    {})
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_conv_matches_torch(batch: int) -> None:
    rng = np.random.default_rng(batch)
    for nd, k, s, p, d, bias in itertools.product((1, 2), (1, 3), (1, 2), (0, 1), (1, 2),
                                                  (True, False)):
        conv = F.conv1d if nd == 1 else F.conv2d
        x = rng.standard_normal((batch, 3) + (9,) * nd).astype(np.float32)
        w = rng.standard_normal((4, 3) + (k,) * nd).astype(np.float32)
        b = rng.standard_normal(4).astype(np.float32)
        want = conv(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b) if bias else None,
                    stride=s, padding=p, dilation=d)
        weights = {"weight": w, **({"bias": b} if bias else {})}
        got = runtime.op_conv([x], {"padding": [p] * nd, "stride": [s] * nd, "dilation": [d] * nd},
                            weights)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
