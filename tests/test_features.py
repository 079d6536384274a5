"""The predictor's features of an artifact: the ONNX graph's counts per op kind, and the numpy
runtime's recurrent loops, which follow its plan rather than the graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.artifact import build_artifact
from deepfleet.compressors._export import export_graph
from deepfleet.compressors._extract import extract
from deepfleet.compressors._graph import analyse
from deepfleet.features import LOOP_FEATURES, artifact_features, complete
from tests.conftest import TinyCNN


class _Stack(nn.Module):
    """A 2-layer GRU over (B, T, 6) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 40, num_layers=2, batch_first=True)
        self.fc = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


def _stack(hidden: tuple[int, int]) -> nn.Module:
    """:class:`_Stack` with ``hidden`` units kept per layer, extracted as DeepIoT leaves it."""
    st = analyse(_Stack().eval(), torch.randn(2, 16, 6))
    return extract(st, st.graph_module, [np.arange(40) < h for h in hidden]).eval()


def _features(model: nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    torch.manual_seed(0)
    ex = export_graph(model.eval(), shape)
    return artifact_features(build_artifact(ex.graph, ex.arrays, {"model": "t"}).files)


@pytest.fixture(scope="module")
def stacks() -> dict[tuple[int, int], dict[str, float]]:
    torch.manual_seed(0)
    return {h: _features(_stack(h), (16, 6)) for h in ((20, 20), (4, 36), (4, 4))}


def test_a_stacks_loop_work_follows_its_summed_hidden_size_not_the_graphs_macs(stacks) -> None:
    """The runtime steps both layers in one loop, one matmul a step by a block matrix of both
    layers' weights: (20, 20) and (4, 36) sum to the same 40 units, so their loops do the same
    work although the graph counts different MACs."""
    even, uneven, small = stacks[(20, 20)], stacks[(4, 36)], stacks[(4, 4)]
    assert even["recurrent_macs"] != uneven["recurrent_macs"]
    assert even["recurrent_loop_macs"] == uneven["recurrent_loop_macs"] > 0
    assert even["recurrent_loop_elems"] == uneven["recurrent_loop_elems"] > 0
    # one wavefront loop: T + layers - 1 steps, not T per layer as the graph's two GRU ops
    assert even["recurrent_loop_steps"] == small["recurrent_loop_steps"] == 16 + 2 - 1
    assert small["recurrent_loop_macs"] < even["recurrent_loop_macs"] / 10  # (8 / 40)^2 of the matmul
    assert all(complete(f) for f in stacks.values())


def test_a_model_without_recurrent_layers_has_no_loop_work() -> None:
    f = _features(TinyCNN(4), (1, 28, 28))
    assert f["conv_macs"] > 0 and complete(f)
    assert [f[k] for k in LOOP_FEATURES] == [0.0, 0.0, 0.0]


def test_features_without_the_loop_features_are_incomplete() -> None:
    f = _features(TinyCNN(4), (1, 28, 28))
    assert not complete({k: v for k, v in f.items() if k != "recurrent_loop_steps"})
    assert not complete({})
