"""Fixtures shared by the whole suite (defined once here).

Models and data: a private model cache per test, the digits data set, every zoo model with
random weights and BatchNorm statistics. Devices: real sshd servers on loopback ports and a
sandbox fleet; nothing is mocked, and fixtures that need what this machine lacks (sshd, root,
namespaces) skip with the reason.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.data import Dataset, load_data
from deepfleet.models import build_model
from deepfleet.orchestrator.fleet import Device
from deepfleet.orchestrator.sandbox import LoopbackSshd, SandboxState, down, read_state, up
from deepfleet.orchestrator.sandbox._sshd import keygen, sshd_binary

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

def _need_sshd() -> None:
    if sshd_binary() is None:
        pytest.skip("sshd not installed (run scripts/system-deps.sh as root)")


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ed25519 user key for the test servers (no passphrase)."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed (openssh-client)")
    key = tmp_path_factory.mktemp("client") / "id_ed25519"
    keygen(key, "deepfleet-tests")
    return key


@pytest.fixture
def sshd_server(tmp_path: Path, client_key: Path) -> Iterator[LoopbackSshd]:
    """A running sshd on 127.0.0.1:<free port> that accepts ``client_key`` for this user."""
    _need_sshd()
    server = LoopbackSshd(tmp_path / "sshd", name="loop", client_key=client_key)
    server.start()
    yield server
    server.kill()


DeviceFor = Callable[..., Device]


@pytest.fixture
def device_for(tmp_path: Path, client_key: Path) -> DeviceFor:
    """Build the fleet entry of a loopback server: ``device_for(server, trust=..., **overrides)``
    with ``trust`` "known_hosts" (a file holding its key) or "fingerprint"."""

    def make(server: LoopbackSshd, *, trust: str = "known_hosts", **overrides: object) -> Device:
        fields: dict[str, object] = dict(
            name=server.name, device_class="x86", host="127.0.0.1", port=server.port,
            user=server.user, key=client_key, python="python3",
            workdir=str(tmp_path / "work"),
        )
        if trust == "known_hosts":
            known = tmp_path / f"known_hosts-{server.port}"
            known.write_text(server.known_hosts_line + "\n")
            fields["known_hosts"] = known
        else:
            import paramiko

            fields["host_key"] = paramiko.PKey.from_path(str(server.host_key_path)).fingerprint
        fields.update(overrides)
        return Device(**fields)  # type: ignore[arg-type]

    return make


def sandbox_missing() -> str | None:
    """Why the sandbox fixtures cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, chroot, cgroups)"
    if sshd_binary() is None:
        return "sshd not installed (run scripts/system-deps.sh as root)"
    if shutil.which("ip") is None:
        return "iproute2 not installed"
    return None


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxState]:
    """A sandbox with one device of each default kind, shared by the whole session."""
    if (why := sandbox_missing()):
        pytest.skip(f"sandbox: {why}")
    directory = tmp_path_factory.mktemp("sandbox")
    lines: list[str] = []
    up(["x86", "x86-slow", "edison", "arm64"], state_dir=directory, echo=lines.append)
    state = read_state(directory)
    assert state is not None, "\n".join(lines)
    yield state
    down(directory)
