"""Fixtures shared by the whole suite (defined once here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.data import Dataset, load_data
from deepfleet.models import build_model

ZOO_SHAPES = {
    "mlp": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "vgg": (3, 16, 16),
    "bilstm": (6, 12),
    "deepsense": (6, 12),
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets a private model cache so that no test depends on another's training."""
    monkeypatch.setenv("DEEPFLEET_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_data("digits")


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so that tests notice if they are mishandled."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
    return model


@pytest.fixture(params=sorted(ZOO_SHAPES))
def zoo_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module, tuple[int, ...]]:
    """(name, model in eval mode with random weights and BN statistics, sample shape)."""
    torch.manual_seed(0)
    shape = ZOO_SHAPES[request.param]
    model = build_model(request.param, input_shape=shape, num_classes=7)
    return request.param, randomize_batchnorm(model).eval(), shape


def random_keep(sizes: list[int], fraction: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = [rng.random(n) < fraction for n in sizes]
    for k in keep:
        k[rng.integers(len(k))] = True
    return keep
