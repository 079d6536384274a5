"""The numpy runtime's conv, pooling and recurrent layers against PyTorch over grids of shapes and settings.

These ops dominate small models' latency, so they are written for speed (one im2col matmul;
pools folded over strided slices; recurrent layers stepped together with their input projections
done before the loop); the grids pin that they still compute exactly what torch does.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

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
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", ["mean", "sum", "amax"])
def test_reduce_matches_torch(fn: str) -> None:
    """Over the time axis of a sequence (one matmul by a vector for mean and sum) and elsewhere,
    on contiguous and transposed inputs (an rnn's batch-first output is a view)."""
    rng = np.random.default_rng(7)
    torch_fn = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax}[fn]
    for shape, dims, keep, transposed in itertools.product(((2, 9, 5), (1, 64, 12), (3, 4, 6, 5)),
                                                           ([1], [-2], [-1], [0], [1, 2]), (False, True),
                                                           (False, True)):
        x = rng.standard_normal(shape).astype(np.float32)
        if transposed:
            x = np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)
        want = torch_fn(torch.from_numpy(np.ascontiguousarray(x)), dim=dims, keepdim=keep).numpy()
        got = runtime.OPS["reduce"]([x], {"fn": fn, "dims": dims, "keepdim": keep}, {})
        assert got.dtype == np.float32 and got.shape == want.shape, (shape, dims, keep)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str((shape, dims, keep)))


# ---------------------------------------------------------------------------- recurrent layers
# The runtime steps every layer of a unidirectional stack in one loop (a wavefront: layer l at
# time t - l) and both directions of a bidirectional layer in another, with every time step's
# input projection done before the loop: these pin each of those paths against torch.


def _rnn_weights(layers: list[nn.RNNBase], bidirectional: bool) -> dict[str, np.ndarray]:
    """The artifact's weights of single-layer torch RNNs stacked (layer i = layers[i])."""
    w = {}
    for i, rnn in enumerate(layers):
        for d in range(2 if bidirectional else 1):
            sfx = "_l0" + ("_reverse" if d else "")
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                t = getattr(rnn, name + sfx, None)
                if t is not None:
                    w[f"l{i}_d{d}_" + name.replace("weight", "w").replace("bias", "b")] = t.detach().numpy()
    return w


def _check_rnn(kind: str, hidden: list[int], *, bidirectional: bool, batch_first: bool, batch: int,
               steps: int, bias: bool = True, seed: int = 0) -> None:
    torch.manual_seed(seed)
    cls = nn.LSTM if kind == "lstm" else nn.GRU
    n_in, d = 4, 2 if bidirectional else 1
    layers = [cls(n_in if i == 0 else d * hidden[i - 1], h, bidirectional=bidirectional,
                  batch_first=batch_first, bias=bias) for i, h in enumerate(hidden)]
    x = torch.randn((batch, steps, n_in) if batch_first else (steps, batch, n_in))
    want_h, want_c, seq = [], [], x
    with torch.no_grad():
        for rnn in layers:
            seq, state = rnn(seq)
            h, c = state if kind == "lstm" else (state, torch.zeros_like(state))
            want_h += list(h.unbind(0))
            want_c += list(c.unbind(0))
    attrs = {"kind": kind, "batch_first": batch_first, "bidirectional": bidirectional, "hidden": hidden}
    got = runtime.op_rnn([x.numpy()], attrs, _rnn_weights(layers, bidirectional))
    where = f"{kind} hidden={hidden} bi={bidirectional} batch_first={batch_first} B={batch} T={steps}"
    assert len(got) == 1 + 2 * len(want_h), where
    np.testing.assert_allclose(got[0], seq.numpy(), rtol=1e-5, atol=1e-6, err_msg=where)
    for i, (h, c) in enumerate(zip(want_h, want_c)):
        np.testing.assert_allclose(got[1 + 2 * i], h.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"h{i} {where}")
        np.testing.assert_allclose(got[2 + 2 * i], c.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"c{i} {where}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("fold", [True, False], ids=["inputs-folded", "inputs-projected"])
@pytest.mark.parametrize("apart", [False, True], ids=["together", "apart"])
def test_rnn_matches_torch(kind: str, bidirectional: bool, fold: bool, apart: bool, monkeypatch) -> None:
    # Narrow inputs are folded into the per-step matmul, wide ones projected before the loop;
    # the layers of a stack (directions of a layer) step together, or apart for large
    # batch x hidden^2.
    monkeypatch.setattr(runtime, "_FOLD_MACS", 10**9 if fold else 0)
    monkeypatch.setattr(runtime, "_APART", 0 if apart else 10**9)
    _check_rnn_cases(kind, bidirectional)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("fold", [True, False], ids=["inputs-folded", "inputs-projected"])
def test_a_gru_with_z_once_matches_torch(bidirectional: bool, fold: bool, monkeypatch) -> None:
    # From a batch x hidden^2 on, a GRU drops z' (1 - z) from its matmul and forms h in three
    # calls: the same outputs by the other road.
    monkeypatch.setattr(runtime, "_FOLD_MACS", 10**9 if fold else 0)
    monkeypatch.setattr(runtime, "_Z_TWICE", 0)
    _check_rnn_cases("gru", bidirectional)


def _check_rnn_cases(kind: str, bidirectional: bool) -> None:
    cases = [  # hidden per layer (ragged, as DeepIoT extracts them), batch, time steps
        ([5], 1, 6), ([5, 5], 3, 7), ([3, 6, 2], 2, 5), ([4, 2], 1, 1), ([6, 3], 4, 2), ([2, 2, 2, 2], 2, 3)]
    for i, (hidden, batch, steps) in enumerate(cases):
        for batch_first in (True, False):
            _check_rnn(kind, hidden, bidirectional=bidirectional, batch_first=batch_first,
                       batch=batch, steps=steps, seed=i)
    _check_rnn(kind, [3, 5], bidirectional=bidirectional, batch_first=True, batch=2, steps=4, bias=False)


def test_a_model_reuses_its_arrays_but_never_what_run_returned() -> None:
    """Compiled ops keep scratch arrays per input shape: a second run (same or other batch)
    must neither change what the first returned nor differ from a fresh model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    from deepfleet.compressors._export import export_graph

    ex = export_graph(model, (1, 8, 8))
    m = runtime.Model(ex.graph, ex.arrays)
    xs = [np.random.default_rng(i).standard_normal((b, 1, 8, 8)).astype(np.float32) for i, b in enumerate((1, 1, 4, 1))]
    outs = [m.run(x) for x in xs]
    for x, out in zip(xs, outs):
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out, runtime.Model(ex.graph, ex.arrays).run(x))


def test_relu_is_folded_only_into_a_layer_nothing_else_reads() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 3, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((torch.relu(y) + y).flatten(1))  # y is read twice: no folding

    torch.manual_seed(0)
    from deepfleet.compressors._export import export_graph

    model = Residual().eval()
    ex = export_graph(model, (2, 4))
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runtime.Model(ex.graph, ex.arrays).run(x), want, rtol=1e-5, atol=1e-6)


def test_compiled_ops_follow_each_new_input_array() -> None:
    """Compiled ops plan their numpy calls per input array and shape: a new array of the same
    shape, or the same array with new contents, must give that input's result."""
    rng = np.random.default_rng(0)
    pool = runtime.COMPILERS["max_pool"]({"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}, {})
    conv_w = {"weight": rng.standard_normal((3, 2, 3, 3)).astype(np.float32)}
    conv = runtime.COMPILERS["conv"]({"padding": [1, 1], "stride": [1, 1], "dilation": [1, 1]}, conv_w)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    for value in (x, x.copy() + 1, x[:1], x):
        want_pool = F.max_pool2d(torch.from_numpy(value), 2).numpy()
        want_conv = F.conv2d(torch.from_numpy(value), torch.from_numpy(conv_w["weight"]), padding=1).numpy()
        np.testing.assert_array_equal(pool(value), want_pool)
        np.testing.assert_allclose(conv(value), want_conv, rtol=1e-5, atol=1e-5)
    x *= -1  # the same array as before, new contents
    np.testing.assert_array_equal(pool(x), F.max_pool2d(torch.from_numpy(x), 2).numpy())


def test_names_in_the_graph_never_become_code() -> None:
    """Model.run is generated Python: value and op names from the artifact must not reach it."""
    graph = {"format": "deepfleet-graph", "version": 1,
             "input": {"name": "x); import os; os._exit(3", "shape": [2], "dtype": "float32"},
             "outputs": ["a, b = 1, 2 #"],
             "ops": [{"name": "a, b = 1, 2 #", "op": "act", "inputs": ["x); import os; os._exit(3"],
                      "attrs": {"fn": "relu"}}],
             "tensors": {}}
    out = runtime.Model(graph, {}).run(np.array([[-1.0, 2.0]], np.float32))
    np.testing.assert_array_equal(out, [[0.0, 2.0]])
