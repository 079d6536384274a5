"""The numpy runtime of the device agent is the oracle: it must reproduce torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepfleet.artifact import open_artifact, write_artifact
from deepfleet.compressors._export import export_graph
from deepfleet.compressors._extract import extract
from deepfleet.compressors._graph import analyse
from deepfleet.device_agent.format import ArtifactCorrupt
from deepfleet.device_agent.runtime import Model, load_model
from deepfleet.errors import ArtifactError, UnsupportedLayerError
from tests.conftest import random_keep


def _max_rel_err(model: nn.Module, shape, batch: int = 4) -> float:
    ex = export_graph(model, shape)
    rt = Model(ex.graph, ex.arrays)
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    out = rt.run(x.numpy())
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def test_runtime_reproduces_every_zoo_model(zoo_model) -> None:
    _, model, shape = zoo_model
    assert _max_rel_err(model, shape) < 1e-5


def test_runtime_reproduces_extracted_models_including_ragged_rnns(zoo_model) -> None:
    _, model, shape = zoo_model
    st = analyse(model, torch.randn(2, *shape))
    small = extract(st, st.graph_module, random_keep([g.size for g in st.groups], 0.3, seed=2))
    assert _max_rel_err(small, shape) < 1e-5


def test_batchnorm_is_folded_into_the_layer_before_it(zoo_model) -> None:
    name, model, shape = zoo_model
    ex = export_graph(model, shape)
    assert "affine" not in {op["op"] for op in ex.graph["ops"]}
    n_bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert ex.params == sum(p.numel() for p in model.parameters()) - n_bn


class _ManyOps(nn.Module):
    """Operations the zoo does not use, each with a torch semantics the runtime must match."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=1, dilation=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding="same", dilation=2)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.mp = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.ada = nn.AdaptiveAvgPool2d((2, 3))
        self.c1d = nn.Conv1d(6, 4, 3, stride=2)
        self.gru = nn.GRU(4, 5, batch_first=False)
        self.fc = nn.Linear(6 * 2 * 3 + 5, 4)

    def forward(self, x):
        a = F.leaky_relu(self.c1(x), 0.1)  # (B, 6, 8, 8)
        a = F.gelu(self.bn(self.c2(a)) + 0.5 * a)
        p = self.pool(a) * torch.sigmoid(self.mp(a)[..., :4, 1:])  # (B, 6, 4, 4): ceil-mode pool is 5x5
        q = F.elu(self.ada(p)).flatten(1)  # (B, 36)
        s = self.c1d(a.mean(-1))  # (B, 4, 3)
        out, h = self.gru(s.permute(2, 0, 1))  # time-major
        z = torch.cat([q, F.silu(h[-1])], dim=-1)
        return F.log_softmax(torch.tanh(self.fc(z)), dim=1)


def test_runtime_matches_torch_on_less_common_operations() -> None:
    torch.manual_seed(1)
    model = _ManyOps().eval()
    from tests.conftest import randomize_batchnorm

    randomize_batchnorm(model)
    assert _max_rel_err(model, (2, 15, 15)) < 1e-5


def test_unexportable_operation_is_named() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(UnsupportedLayerError, match="zero padding"):
        export_graph(model, (2, 4, 4))


def test_artifacts_are_content_addressed_deterministic_and_verified(tmp_path, zoo_model) -> None:
    name, model, shape = zoo_model
    ex = export_graph(model, shape)
    a1 = write_artifact(tmp_path / "a", ex.graph, ex.arrays, {"model": name})
    a2 = write_artifact(tmp_path / "b", ex.graph, ex.arrays, {"model": name})
    assert a1.digest == a2.digest == a1.path.name
    assert open_artifact(a1.path).manifest["weights_bytes"] > 0
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    np.testing.assert_allclose(load_model(str(a1.path)).run(x), Model(ex.graph, ex.arrays).run(x), rtol=0, atol=0)
    # flip one byte of the weights: both the agent and the driver see the corruption
    w = a1.path / "weights.npz"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupt, match="corrupt"):
        load_model(str(a1.path))
    with pytest.raises(ArtifactError, match="corrupt"):
        open_artifact(a1.path)


def test_unknown_graph_version_is_refused() -> None:
    ex = export_graph(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,))
    graph = json.loads(json.dumps(ex.graph))
    graph["version"] = 99
    with pytest.raises(ArtifactCorrupt, match="update the agent"):
        Model(graph, ex.arrays)
