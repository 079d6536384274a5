"""Fixtures shared by the whole suite (defined once here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.compressors import Context
from deepfleet.data import Dataset, load_data
from deepfleet.models import build_model

# The suite's models are tiny: one thread is faster than two fighting over shared cores
# (measured: a one-epoch GRU fine-tune took 0.14 s with 1 thread, ~10 s with 2 on a loaded box).
torch.set_num_threads(1)

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


# ---------------------------------------------------------------------------- compressors


class TinyCNN(nn.Module):
    """A small conv net with BatchNorm (to be folded), pooling, flatten and two Linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 5)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 24), nn.Linear(24, num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))  # (B, 6, 12, 12)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 8, 4, 4)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


class TinyGRU(nn.Module):
    """Conv1d + BatchNorm, then a 2-layer GRU over time and a classifier: the recurrent case."""

    def __init__(self, channels: int = 6, num_classes: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(channels, 12, 3, padding=1), nn.BatchNorm1d(12)
        self.gru = nn.GRU(12, 10, num_layers=2, batch_first=True)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))  # (B, 12, T)
        out, _ = self.gru(x.transpose(1, 2))  # (B, T, 10)
        return self.fc(out.mean(1))


def _subset(data: Dataset, n_train: int, n_val: int, n_test: int) -> Dataset:
    return Dataset(
        name=f"{data.name}-tiny", X_train=data.X_train[:n_train], y_train=data.y_train[:n_train],
        X_val=data.X_val[:n_val], y_val=data.y_val[:n_val], X_test=data.X_test[:n_test],
        y_test=data.y_test[:n_test], num_classes=data.num_classes, fingerprint=f"{data.fingerprint}-tiny",
    )


@pytest.fixture(scope="session")
def tiny_digits(digits: Dataset) -> Dataset:
    """256 / 128 / 128 samples of digits: enough to fine-tune for an epoch in a blink."""
    return _subset(digits, 256, 128, 128)


@pytest.fixture(scope="session")
def tiny_sequences() -> Dataset:
    """Random 6-channel sequences of 12 steps with 4 labels a linear rule can tell apart."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(384, 6, 12)).astype(np.float32)
    y = (X[:, :2].mean((1, 2)) > 0).astype(np.int64) * 2 + (X[:, 2:4].mean((1, 2)) > 0)
    return Dataset(name="seq-tiny", X_train=X[:256], y_train=y[:256], X_val=X[256:320], y_val=y[256:320],
                   X_test=X[320:], y_test=y[320:], num_classes=4, fingerprint="seq-tiny")


def _trained(model: nn.Module, data: Dataset, seed: int) -> nn.Module:
    from deepfleet.training import TrainConfig, train

    torch.manual_seed(seed)
    model, _ = train(model, data, TrainConfig(epochs=3, lr=3e-3), seed=seed, progress=False)
    return randomize_batchnorm_stats(model).eval()


def randomize_batchnorm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics (but trained affine parameters): folding must use them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.add_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
    return model


@pytest.fixture(scope="session")
def tiny_cnn(tiny_digits: Dataset) -> nn.Module:
    """TinyCNN trained for 3 epochs on ``tiny_digits`` (eval mode; do not modify it)."""
    torch.manual_seed(0)
    return _trained(TinyCNN(), tiny_digits, seed=0)


@pytest.fixture(scope="session")
def tiny_gru(tiny_sequences: Dataset) -> nn.Module:
    torch.manual_seed(0)
    return _trained(TinyGRU(), tiny_sequences, seed=0)


@pytest.fixture(params=["cnn", "gru"])
def tiny_case(request: pytest.FixtureRequest) -> tuple[nn.Module, Dataset]:
    """(trained tiny model, its data): the conv case and the recurrent case."""
    if request.param == "cnn":
        return request.getfixturevalue("tiny_cnn"), request.getfixturevalue("tiny_digits")
    return request.getfixturevalue("tiny_gru"), request.getfixturevalue("tiny_sequences")


def quick_context(seed: int = 0, epochs: int = 1) -> Context:
    """A compression context with a one-epoch fine-tuning schedule (tests only)."""
    from deepfleet.training import TrainConfig

    return Context(seed=seed, finetune=TrainConfig(epochs=epochs, kd_alpha=0.5, lr=1e-3))


def runtime_error(model: nn.Module, encodings: dict, data: Dataset, *, n: int = 64) -> tuple[float, np.ndarray, np.ndarray]:
    """Export ``model`` with ``encodings``, run the numpy runtime on test samples; return
    (max |runtime - torch| / max |torch|, runtime outputs, torch outputs)."""
    from deepfleet.compressors import export_graph
    from deepfleet.device_agent.agent import Model

    ex = export_graph(model, data.input_shape, encodings)
    x = data.X_test[:n]
    with torch.no_grad():
        ref = model.eval()(torch.as_tensor(x)).numpy()
    out = Model(ex.graph, ex.arrays).run(x)
    return float(np.abs(out - ref).max() / np.abs(ref).max()), out, ref
