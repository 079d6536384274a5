from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.compressors._graph import analyse
from deepfleet.errors import UnsupportedLayerError
from deepfleet.models import build_model


def test_lenet5_groups_and_the_flatten_block_structure() -> None:
    m = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    st = analyse(m, torch.randn(2, 1, 28, 28))
    assert [(g.name, g.size) for g in st.groups] == [("conv1", 20), ("conv2", 50), ("fc1", 500)]
    fc1 = st.layer("fc1")
    conv2 = st.groups[1]
    # after flatten, conv2's channel c owns features 16c .. 16c+15
    expected = np.repeat(np.arange(conv2.offset + 1, conv2.offset + 51), 16)
    assert np.array_equal(fc1.in_ids, expected)
    assert (st.layer("conv1").in_ids == 0).all()  # the input is never pruned
    assert st.layer("fc2").groups == [None]  # the output layer is never pruned


def test_deepsense_concatenation_offsets_and_rnn_groups() -> None:
    m = build_model("deepsense", input_shape=(6, 16), num_classes=6)
    st = analyse(m, torch.randn(2, 6, 16))
    names = [g.name for g in st.groups]
    assert names[-2:] == ["gru.l0", "gru.l1"]
    merge_in = st.layer("merge.0").in_ids
    b0, b1 = st.groups[1], st.groups[3]  # second conv of each branch
    assert np.array_equal(merge_in[:32], np.arange(b0.offset + 1, b0.offset + 33))
    assert np.array_equal(merge_in[32:], np.arange(b1.offset + 1, b1.offset + 33))
    assert st.layer("branches.0.0").norms == ["branches.0.1"]


def test_bidirectional_lstm_features_map_to_units_twice() -> None:
    m = build_model("bilstm", input_shape=(6, 10), num_classes=4)
    st = analyse(m, torch.randn(2, 6, 10))
    last = st.groups[-1]
    fc = st.layer("fc").in_ids
    units = np.arange(last.offset + 1, last.offset + 1 + last.size)
    assert np.array_equal(fc, np.concatenate([units, units]))  # forward then backward direction


class _LayerNormAfterLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class _BatchNormAfterCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)
        self.bn, self.out = nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.bn(torch.cat([self.a(x), self.b(x)], 1)))


class _ReturnsFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h


class _SumOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(2, 8, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(1))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc2(self.fc1(x))


@pytest.mark.parametrize(
    ("model", "shape", "needle"),
    [
        (nn.Sequential(nn.Linear(8, 8), nn.Embedding(8, 4)), (8,), "Embedding"),
        (_LayerNormAfterLinear(), (8,), "(LayerNorm) is not supported"),
        (_BatchNormAfterCat(), (8,), "'bn'"),
        (_ReturnsFeatures(), (8,), "reach the model's output"),
        (_SumOverChannels(), (2, 8), "combines several units"),
        (_DataDependent(), (8,), "cannot be traced"),
        (nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(24, 2)), (4, 8), "groups=2"),
        (nn.Sequential(nn.Flatten(), nn.Linear(8, 2)), (8,), "no prunable hidden layer"),
    ],
)
def test_unsupported_models_are_refused_with_a_named_reason(model: nn.Module, shape, needle: str) -> None:
    with pytest.raises(UnsupportedLayerError) as err:
        analyse(model.eval(), torch.randn(2, *shape))
    assert needle in str(err.value)
