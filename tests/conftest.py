"""Fixtures shared by the whole suite (defined once here).

Models and data: a private model cache per test, the digits data set, every zoo model with
random weights and BatchNorm statistics. Devices: real sshd servers on loopback ports and a
sandbox fleet; nothing is mocked, and fixtures that need what this machine lacks (sshd, root,
namespaces) skip with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.artifact import Artifact, write_artifact
from deepfleet.compressors import Context
from deepfleet.compressors._export import export_graph
from deepfleet.data import Dataset, load_data
from deepfleet.device_agent import bundle, powersim
from deepfleet.device_agent.runtime import Model
from deepfleet.models import build_model
from deepfleet.orchestrator.device import DeviceSession
from deepfleet.orchestrator.fleet import LOCAL_DEVICE, Device
from deepfleet.orchestrator.ssh import Timeouts
from deepfleet.sandbox import LoopbackSshd, SandboxState, down, read_state, up
from deepfleet.sandbox._sshd import keygen, sshd_binary

# The suite's models are tiny: one thread is faster than two fighting over shared cores
# (measured: a one-epoch GRU fine-tune took 0.14 s with 1 thread, ~10 s with 2 on a loaded box).
torch.set_num_threads(1)

ZOO_SHAPES = {
    "mlp": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "vgg": (3, 16, 16),
    "bilstm": (6, 12),
    "deepsense": (6, 12),
    "deepear": (24, 8),  # the audio set's (mel bands, frames): DeepEar's 2.3 M parameters
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


#: Where sandboxes keep their roots, wheels and x86 runtime: the cache in effect when the
#: session starts (``$DEEPFLEET_CACHE`` or ``~/.cache/deepfleet``), not each test's private one,
#: so that a root or wheel is built or fetched once per machine, not once per test.
SANDBOX_CACHE = os.environ.get("DEEPFLEET_CACHE") or str(Path.home() / ".cache" / "deepfleet")


@pytest.fixture
def sandbox_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """For a test that runs its own ``up``: the shared :data:`SANDBOX_CACHE` in effect."""
    monkeypatch.setenv("DEEPFLEET_CACHE", SANDBOX_CACHE)
    return Path(SANDBOX_CACHE)


def _sandbox_up(directory: Path, kinds: list[str]) -> SandboxState:
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPFLEET_CACHE", SANDBOX_CACHE)
        up(kinds, state_dir=directory, echo=lines.append)
    state = read_state(directory)
    assert state is not None, "\n".join(lines)
    return state


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxState]:
    """A sandbox with one device of each default kind, shared by the whole session."""
    if (why := sandbox_missing()):
        pytest.skip(f"sandbox: {why}")
    directory = tmp_path_factory.mktemp("sandbox")
    yield _sandbox_up(directory, ["x86", "x86-slow", "edison", "arm64"])
    down(directory)


@pytest.fixture(scope="session")
def sandbox_armhf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxState]:
    """A sandbox with one armhf device (not a default kind: its root takes about a minute more
    to build), for the tests marked ``slow`` that need it."""
    if (why := sandbox_missing()):
        pytest.skip(f"sandbox: {why}")
    directory = tmp_path_factory.mktemp("sandbox-armhf")
    yield _sandbox_up(directory, ["armhf"])
    down(directory)



# ---------------------------------------------------------------------------- device agent

TINY_SHAPE = (3, 16)


def tiny_model() -> nn.Module:
    """Conv1d -> ReLU -> Linear on (3, 16) samples: ~40 µs per numpy run, stable latency."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14, 5)).eval()


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """A real artifact of :func:`tiny_model` (export_graph + write_artifact). Do not modify it:
    copy it (``shutil.copytree``, keeping the directory name) to corrupt it."""
    model = tiny_model()
    ex = export_graph(model, TINY_SHAPE)
    manifest = {"model": "tiny", "params": ex.params, "macs": ex.macs,
                "input_shape": list(TINY_SHAPE), "compressor": {"method": "none"}}
    return write_artifact(tmp_path_factory.mktemp("artifacts"), ex.graph, ex.arrays, manifest)


LITERT_SKIP = "the LiteRT converter (litert-torch) is not installed: pip install 'deepfleet[litert]'"


def tiny_tflite() -> bytes | None:
    """:func:`tiny_model` as a checked batch-1 model.tflite, or None without the extra."""
    from deepfleet import _litert

    if not _litert.available():
        return None
    x = np.random.default_rng(0).standard_normal((4, *TINY_SHAPE), dtype=np.float32)
    model = tiny_model()
    with torch.no_grad():
        expected = [model(torch.as_tensor(x)).numpy()]
    return _litert.export_tflite(model, TINY_SHAPE, x=x, expected=expected).data


@pytest.fixture(scope="session")
def tiny_litert_artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """:func:`tiny_model` as an artifact with model.tflite declared in its manifest (skipped
    without the extra ``deepfleet[litert]``). Do not modify it: copy it to corrupt it."""
    from deepfleet._litert import TfliteModel

    data = tiny_tflite()
    if data is None:
        pytest.skip(LITERT_SKIP)
    ex = export_graph(tiny_model(), TINY_SHAPE)
    manifest = {"model": "tiny", "params": ex.params, "macs": ex.macs,
                "input_shape": list(TINY_SHAPE), "compressor": {"method": "none"}}
    return write_artifact(tmp_path_factory.mktemp("litert"), ex.graph, ex.arrays, manifest,
                          tflite=TfliteModel(data, {"batch": 1}))


@pytest.fixture(scope="session")
def agent_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one file shipped to devices, built once for the session (``bundle.agent_file``)."""
    return bundle.agent_file(tmp_path_factory.mktemp("built-agent"))


class AgentProcess:
    """``python agent.py serve`` (the built, shipped file) as a subprocess, spoken to in JSON lines.

    A test-only client (the orchestrator's transport is the real one): ``request(obj)`` sends
    one line and returns the parsed reply, failing the test after ``timeout`` seconds.
    """

    def __init__(self, cwd: Path, agent_file: Path, python: str = sys.executable) -> None:
        self.proc = subprocess.Popen(
            [python, str(agent_file), "serve"], cwd=cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._buf = b""

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_line(self, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise TimeoutError(f"agent gave no reply within {timeout} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError(f"agent exited ({self.proc.wait()}): {self.stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def request(self, obj: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        self.send_raw((json.dumps(obj) + "\n").encode())
        reply = json.loads(self.read_line(timeout))
        assert isinstance(reply, dict)
        return reply

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def start_agent(tmp_path: Path, agent_file: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Factory of running agents (killed at teardown): ``start_agent(python=...)`` runs the
    agent under another interpreter (default: this one)."""
    agents: list[AgentProcess] = []

    def start(python: str = sys.executable) -> AgentProcess:
        agents.append(AgentProcess(tmp_path, agent_file, python))
        return agents[-1]

    yield start
    for a in agents:
        a.close()


@pytest.fixture
def agent(start_agent: Callable[[], AgentProcess]) -> AgentProcess:
    """A fresh agent for this test (use it when the test ends or breaks the agent)."""
    return start_agent()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory, agent_file: Path) -> Iterator[AgentProcess]:
    """One agent for a whole module, for tests that leave it serving (saves a start per test)."""
    a = AgentProcess(tmp_path_factory.mktemp("agent"), agent_file)
    yield a
    a.close()


@pytest.fixture
def start_powersim(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``start_powersim(pids=[...], **options)`` runs powersim.py as its own process and returns
    the directory to give the agent as ``energy.path`` (stopped at teardown)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**options: Any) -> Path:
        out = tmp_path / f"sim{len(procs)}"
        procs.append(powersim.spawn(out, **options))
        return out

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


# ---------------------------------------------------------------------------- sessions, faults

#: Short SSH timeouts for tests that break links and devices on purpose.
FAST_TIMEOUTS = Timeouts(connect=3, banner=3, auth=3, channel_open=3, kill=3,
                         reconnect_delays=(0.1, 0.2))

#: A quick measure request (5 runs, no settling, no energy sampling): agent overhead, not a
#: benchmark.
QUICK_REQUEST: dict[str, Any] = {"warmup": 1, "min_runs": 5, "max_runs": 5, "min_seconds": 0,
                                 "max_seconds": 5, "ci_target": None,
                                 "thermal": {"settle_max_s": 0}, "energy": {"source": "none"}}


@pytest.fixture
def fast_session() -> Callable[[Device], DeviceSession]:
    """A session factory with short timeouts: a lost device fails a test in seconds."""

    def make(device: Device) -> DeviceSession:
        return DeviceSession(device, timeouts=FAST_TIMEOUTS, hello_timeout_s=30,
                             deadline_margin_s=2)

    return make


@pytest.fixture
def local_device(tmp_path: Path) -> Device:
    """The built-in local device with a private work directory (not ~/.deepfleet)."""
    return dataclasses.replace(LOCAL_DEVICE, workdir=str(tmp_path / "local-work"))


@pytest.fixture(scope="session")
def python_without_numpy(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real Python interpreter that cannot import numpy (a fresh venv without packages)."""
    import venv

    directory = tmp_path_factory.mktemp("venv-no-numpy")
    venv.EnvBuilder(with_pip=False).create(directory)
    python = str(directory / "bin" / "python")
    probe = subprocess.run([python, "-c", "import numpy"], capture_output=True)
    assert probe.returncode != 0, "the fresh venv unexpectedly has numpy"
    return python


@pytest.fixture(scope="session")
def python_without_onnxruntime(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real Python interpreter with numpy but without onnxruntime (a device that has only
    numpy, like an Edison): a fresh venv whose site-packages holds only this interpreter's numpy
    (linked), so it stays without onnxruntime whatever this machine installs system-wide."""
    import venv

    import numpy

    directory = tmp_path_factory.mktemp("venv-numpy-only")
    venv.EnvBuilder(with_pip=False).create(directory)
    python = str(directory / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    package = Path(numpy.__file__).parent
    for name in (package.name, package.name + ".libs"):  # numpy.libs: the wheel's OpenBLAS
        if (package.parent / name).exists():
            (site / name).symlink_to(package.parent / name)
    probe = subprocess.run([python, "-c", "import numpy, importlib.util as u; "
                            "assert u.find_spec('onnxruntime') is None"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make an interpreter with numpy and without onnxruntime: {probe.stderr[-300:]}")
    return python


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
    from deepfleet.compressors.training import TrainConfig, train

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
    from deepfleet.compressors.training import TrainConfig

    return Context(seed=seed, finetune=TrainConfig(epochs=epochs, kd_alpha=0.5, lr=1e-3))


def runtime_error(model: nn.Module, encodings: dict, data: Dataset, *, n: int = 64) -> tuple[float, np.ndarray, np.ndarray]:
    """Export ``model`` with ``encodings``, run the numpy runtime on test samples; return
    (max |runtime - torch| / max |torch|, runtime outputs, torch outputs)."""
    ex = export_graph(model, data.input_shape, encodings)
    x = data.X_test[:n]
    with torch.no_grad():
        ref = model.eval()(torch.as_tensor(x)).numpy()
    out = Model(ex.graph, ex.arrays).run(x)
    return float(np.abs(out - ref).max() / np.abs(ref).max()), out, ref
