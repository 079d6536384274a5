"""model.onnx: onnxruntime must reproduce torch (the oracle) for every zoo model and method,
within float rounding for float graphs and within a quantisation step for int8 QDQ graphs,
and must really run integer kernels for 8-bit fixed point."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepfleet._onnx as onnx_module
from deepfleet._onnx import CONVERTERS, TOLERANCE_QDQ, export_onnx, run_onnx, session, to_onnx
from deepfleet.api import export_artifact
from deepfleet.artifact import (
    ONNX_FILE,
    artifact_files,
    build_artifact,
    open_artifact,
    save_artifact,
    write_artifact,
)
from deepfleet.compressors import make_compressor, run_pipeline
from deepfleet.compressors._export import export_graph
from deepfleet.compressors._extract import extract
from deepfleet.compressors._graph import analyse
from deepfleet.data import Dataset
from deepfleet.device_agent import agent, backends, format, runtime
from deepfleet.device_agent.protocol import AgentError
from deepfleet.errors import ArtifactError, ExportError
from deepfleet.models import build_model
from tests.compressors.test_export import _ManyOps
from tests.compressors.test_pipeline import QUICK
from tests.conftest import ZOO_SHAPES, quick_context, random_keep, randomize_batchnorm

# The zoo at its smallest inputs: every layer kind, a fraction of the work.
SMALL_SHAPES = {"mlp": (1, 8, 8), "lenet5": (1, 16, 16), "vgg": (3, 8, 8), "bilstm": (6, 6),
                "deepsense": (6, 6), "deepear": (8, 4)}
PIPELINES = ["deepiot+fixedpoint", "l1+lowrank+magnitude+fixedpoint", "dns+kmeans",
             "rdeepsense+magnitude+fixedpoint+temperature", "deepiot+sparsesep+temperature"]


def _data(shape: tuple[int, ...], n: int = 48) -> Dataset:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, *shape)).astype(np.float32)
    y = np.arange(n) % 5
    third = n // 3
    return Dataset(name="noise", X_train=X[:third], y_train=y[:third], X_val=X[third:2 * third],
                   y_val=y[third:2 * third], X_test=X[2 * third:], y_test=y[2 * third:], num_classes=5,
                   fingerprint="noise")


@pytest.fixture(scope="module", params=sorted(SMALL_SHAPES))
def small_zoo(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Dataset]:
    """(name, zoo model with random weights and BatchNorm statistics, noise data of its shape)."""
    torch.manual_seed(0)
    shape = SMALL_SHAPES[request.param]
    model = build_model(request.param, input_shape=shape, num_classes=5)
    return request.param, randomize_batchnorm(model).eval(), _data(shape)


def _compress(model: nn.Module, data: Dataset, methods: str, **extra: dict) -> tuple[nn.Module, dict]:
    steps = [make_compressor(m, {**QUICK[m], **extra.get(m, {})}) for m in methods.split("+")]
    res = run_pipeline(model, data, steps, ctx=quick_context())
    return res.model.eval(), res.encodings


def _oracle(model: nn.Module, encodings: dict, data: Dataset) -> tuple[float, np.ndarray, np.ndarray, onnx_module.OnnxModel]:
    """(max |onnxruntime - torch| / max |torch| on test samples, both outputs, the ONNX model)."""
    ex = export_graph(model, data.input_shape, encodings)
    om = to_onnx(ex.graph, ex.arrays)
    x = data.X_test
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    out = run_onnx(om.data, x)[0]
    return float(np.abs(out - ref).max() / np.abs(ref).max()), out, ref, om


def _optimised_ops(om: onnx_module.OnnxModel, tmp_path: Path) -> Counter:
    """The op types of the graph onnxruntime runs, after its optimisations and fusions."""
    path = tmp_path / "optimised.onnx"
    session(om.data, optimized=str(path))
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_every_runtime_op_has_an_onnx_converter() -> None:
    assert set(CONVERTERS) == set(runtime.OPS)


def test_onnxruntime_reproduces_every_zoo_model(zoo_model) -> None:
    _, model, shape = zoo_model
    ex = export_graph(model, shape)
    om = to_onnx(ex.graph, ex.arrays)
    x = np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    out = run_onnx(om.data, x)[0]
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    assert om.info == {"opset": 17, "weights": "float32", "activations": "float32"}


def test_onnxruntime_reproduces_extracted_models_including_ragged_rnns(zoo_model) -> None:
    _, model, shape = zoo_model
    st = analyse(model, torch.randn(2, *shape))
    small = extract(st, st.graph_module, random_keep([g.size for g in st.groups], 0.3, seed=2)).eval()
    ex = export_graph(small, shape)
    x = np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = small(torch.as_tensor(x)).numpy()
    assert np.abs(run_onnx(to_onnx(ex.graph, ex.arrays).data, x)[0] - ref).max() / np.abs(ref).max() < 1e-5


class _Rare(nn.Module):
    """What neither the zoo nor _ManyOps uses: a time-major biasless 2-layer biLSTM whose final
    states are read, a Linear on a 3-D tensor, stack, adaptive max pooling, an unfoldable
    BatchNorm (affine), a parameter read directly (const), hardtanh, softmax, tanh-GELU, and
    a constant on the left of a division."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, bias=False)
        self.fc = nn.Linear(8, 3)
        self.ada = nn.AdaptiveMaxPool1d(3)
        self.bn = nn.BatchNorm1d(5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 5, 7)
        out, (h, c) = self.lstm(x.permute(2, 0, 1))  # (T, B, 8)
        y = self.fc(out).mean(0)  # (B, 3)
        z = torch.stack([h[-1], c[0]], dim=1).sum(1)  # (B, 4)
        a = self.ada(self.bn(torch.relu(x)))[:, None, 1:, -1].flatten(1)  # (B, 4)
        g = F.softmax(F.hardtanh(x[..., 0] * self.scale[:5], -0.5, 0.5) - 1.0, dim=-1)
        q = F.gelu(x[:, 1, :2], approximate="tanh") + 2.0 / (1.5 + torch.sigmoid(x[:, 2, :2]))
        return torch.cat([y, z, a, g, q], 1)


@pytest.mark.parametrize(("module", "shape"), [(_ManyOps, (2, 15, 15)), (_Rare, (5, 7))])
def test_onnxruntime_matches_torch_on_less_common_operations(module: type[nn.Module], shape) -> None:
    torch.manual_seed(1)
    model = randomize_batchnorm(module()).eval()
    ex = export_graph(model, shape)
    assert {"affine", "const"} <= {op["op"] for op in ex.graph["ops"]} or module is _ManyOps
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    out = run_onnx(to_onnx(ex.graph, ex.arrays).data, x)[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("methods", sorted(QUICK) + PIPELINES)
def test_oracle_every_zoo_model_and_method(methods: str, small_zoo) -> None:
    name, model, data = small_zoo
    small, encodings = _compress(model, data, methods)
    err, out, ref, om = _oracle(small, encodings, data)
    assert err < 1e-5, f"{name} / {methods}: onnxruntime differs from torch by {err:.2e}"
    assert (out.argmax(1) == ref.argmax(1)).all()
    quantised = any(m in ("fixedpoint", "kmeans", "pq", "rq", "binary", "sparsesep") for m in methods.split("+"))
    # fixed point at QUICK's 6 bits, codebooks and bits: the decoded weights
    assert om.info["weights"] == ("decoded float32" if quantised else "float32")


def test_fixed_point_8_bit_qdq_runs_integer_kernels_within_a_quantisation_step(small_zoo, tmp_path) -> None:
    name, model, data = small_zoo
    small, encodings = _compress(model, data, "fixedpoint", fixedpoint={"bits": 8, "act_bits": 8})
    err, out, ref, om = _oracle(small, encodings, data)
    assert om.info == {"opset": 17, "weights": "int8 QDQ", "activations": "int8 QDQ"}
    assert err < TOLERANCE_QDQ, f"{name}: QDQ differs from the fake-quantised torch model by {err:.2e}"
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    codes = [i for i in onnx.load_from_string(om.data).graph.initializer if i.data_type == onnx.TensorProto.INT8 and i.dims]
    assert codes, "8-bit weights travel as int8 initialisers"
    ops = _optimised_ops(om, tmp_path)
    convs = sum(isinstance(m, nn.Conv1d | nn.Conv2d) for m in small.modules())
    linears = sum(isinstance(m, nn.Linear) for m in small.modules())
    # every Conv and Linear layer runs an integer kernel (onnxruntime's QDQ fusions)
    assert ops["QLinearConv"] == convs and ops["QGemm"] + ops["QLinearMatMul"] == linears, ops
    assert ops["Conv"] == ops["FusedConv"] == ops["Gemm"] == ops["FusedGemm"] == 0, ops


def test_fixed_point_8_bit_weights_alone_are_int8_and_exact(small_zoo) -> None:
    _, model, data = small_zoo
    small, encodings = _compress(model, data, "fixedpoint", fixedpoint={"bits": 8})
    err, _, _, om = _oracle(small, encodings, data)
    assert om.info["weights"] == "int8 QDQ" and om.info["activations"] == "float32"
    assert err < 1e-5
    types = Counter(i.data_type for i in onnx.load_from_string(om.data).graph.initializer if i.dims)
    assert types[onnx.TensorProto.INT8] >= 1


def test_other_widths_of_fixed_point_activations_are_exact_float_ops(tiny_cnn, tiny_digits) -> None:
    small, encodings = _compress(tiny_cnn, tiny_digits, "fixedpoint", fixedpoint={"bits": 8, "act_bits": 6})
    err, _, _, om = _oracle(small, encodings, tiny_digits)
    assert om.info["activations"] == "fixed point as float ops" and err < 1e-5


def test_bytes_are_deterministic_and_the_manifest_holds_their_hash(tmp_path, tiny_cnn, tiny_digits) -> None:
    small, encodings = _compress(tiny_cnn, tiny_digits, "fixedpoint", fixedpoint={"bits": 8, "act_bits": 8})
    ex = export_graph(small, tiny_digits.input_shape, encodings)
    ex2 = export_graph(small, tiny_digits.input_shape, encodings)
    assert to_onnx(ex.graph, ex.arrays).data == to_onnx(ex2.graph, ex2.arrays).data
    a = write_artifact(tmp_path / "a", ex.graph, ex.arrays, {"model": "tiny"})
    b = write_artifact(tmp_path / "b", ex2.graph, ex2.arrays, {"model": "tiny"})
    assert a.digest == b.digest
    data = (a.path / ONNX_FILE).read_bytes()
    assert (b.path / ONNX_FILE).read_bytes() == data
    onnx_entry = json.loads((a.path / "manifest.json").read_text())["onnx"]
    assert onnx_entry["sha256"] == format.file_digest(str(a.path / ONNX_FILE))
    assert onnx_entry["file"] == ONNX_FILE and onnx_entry["weights"] == "int8 QDQ"
    # a search trial ships it to the driver with the other files (bytes through Ray)
    assert artifact_files(a.path) == (*format.ARTIFACT_FILES, ONNX_FILE)
    in_memory = build_artifact(ex.graph, ex.arrays, {"model": "tiny"})
    assert in_memory.digest == a.digest and ONNX_FILE in in_memory.files
    shipped = save_artifact(tmp_path / "driver", in_memory)
    assert open_artifact(shipped.path).manifest["onnx"] == onnx_entry  # verified, model.onnx included
    # a changed byte of model.onnx is seen on the host and by the agent's onnxruntime backend
    bad = tmp_path / "bad" / a.digest
    shutil.copytree(a.path, bad)
    raw = bytearray(data)
    raw[len(raw) // 2] ^= 0xFF
    (bad / ONNX_FILE).write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="model.onnx"):
        open_artifact(bad)
    with pytest.raises(AgentError, match="model.onnx") as err:
        backends.ModelCache().get(str(bad), "onnxruntime")
    assert err.value.kind == "artifact_corrupt"  # the driver uploads it again


def test_an_export_that_differs_from_torch_fails_naming_the_op_and_writes_nothing(
        tmp_path, tiny_cnn, tiny_digits, monkeypatch) -> None:
    def wrong_relu(b, c, op, xs, out):  # a converter bug: relu becomes sigmoid
        b.node("Sigmoid" if op["attrs"]["fn"] == "relu" else "Identity", xs, out)

    monkeypatch.setitem(CONVERTERS, "act", wrong_relu)
    with pytest.raises(ExportError, match=r"max \|onnxruntime - torch\| is .*op 'relu' \(act\)"):
        export_artifact(tiny_cnn, model="tiny", data=tiny_digits, seed=0, compressor={}, val_accuracy=1.0)
    ex = export_graph(tiny_cnn, tiny_digits.input_shape)
    with pytest.raises(ExportError, match="numpy runtime"):
        write_artifact(tmp_path / "direct", ex.graph, ex.arrays, {})
    assert not (tmp_path / "direct").exists()


def test_the_agent_measures_and_runs_model_onnx_like_torch(tmp_path, tiny_gru, tiny_sequences) -> None:
    ex = export_graph(tiny_gru, tiny_sequences.input_shape)
    art = write_artifact(tmp_path, ex.graph, ex.arrays, {"model": "tiny-gru", "params": ex.params,
                                                         "macs": ex.macs})
    cache = backends.ModelCache()
    r = agent.measure({"op": "measure", "artifact": str(art.path), "backend": "onnxruntime",
                       "threads": 1, "warmup": 1, "min_runs": 5, "max_runs": 5, "min_seconds": 0,
                       "energy": {"source": "none"}}, cache)
    assert r["ok"] and r["backend"] == "onnxruntime" and r["runs"] == 5
    assert r["backend_file_sha256"] == art.manifest["onnx"]["sha256"]
    x = tiny_sequences.X_test[:8]
    out = agent.infer({"op": "infer", "artifact": str(art.path), "backend": "onnxruntime",
                       "input": x.tolist()}, cache)
    with torch.no_grad():
        ref = tiny_gru(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(out["outputs"][0], dtype=np.float32), ref, rtol=0, atol=1e-5)


def test_export_onnx_without_a_reference_checks_against_the_numpy_runtime(tiny_cnn, tiny_digits) -> None:
    ex = export_graph(tiny_cnn, tiny_digits.input_shape)
    om = export_onnx(ex.graph, ex.arrays)
    x = tiny_digits.X_test[:4]
    np.testing.assert_allclose(run_onnx(om.data, x)[0], runtime.Model(ex.graph, ex.arrays).run(x), atol=1e-5)
    with pytest.raises(ExportError, match="no input"):
        to_onnx({"format": "deepfleet-graph", "version": 1, "ops": []}, {})


def test_zoo_shapes_cover_the_same_models() -> None:
    assert set(SMALL_SHAPES) == set(ZOO_SHAPES)
