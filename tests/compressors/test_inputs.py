"""Inputs as compression targets (``deepiot.inputs``): which input units a model has, that the
masked model equals the extracted one (dead branches included), that the cost model counts the
extracted parameters exactly, the ``gather`` op on every backend, and DeepIoT end to end."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet._onnx import export_onnx
from deepfleet.artifact import write_artifact
from deepfleet.compressors import make_compressor, run_pipeline
from deepfleet.compressors._cost import cost, cost_model, effective_keep, kept_fraction
from deepfleet.compressors._export import export_graph
from deepfleet.compressors._extract import Gather, check_extraction, extract, input_masking_problem
from deepfleet.compressors._graph import analyse
from deepfleet.compressors._masked import masked_model
from deepfleet.data import Dataset
from deepfleet.device_agent.backends import BACKEND_CLASSES, BACKEND_FILES
from deepfleet.device_agent.runtime import OPS
from deepfleet.errors import ConfigError, UnsupportedLayerError
from deepfleet.models import build_model
from tests.conftest import quick_context, randomize_batchnorm

SENSORS = ("acc",) * 3 + ("gyro",) * 3
CASES = [  # (model, sample shape, inputs, sensors)
    ("mlp", (1, 6, 6), "features", None),
    ("mlp", (10,), "features", None),
    ("deepsense", (6, 12), "sensors", SENSORS),
    ("deepsense", (6, 12), "features", None),
    ("bilstm", (1, 6, 6), "features", None),
    ("bilstm", (6, 8), "sensors", SENSORS),
    ("vgg", (3, 16, 16), "features", None),
]


def _model(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(build_model(name, input_shape=shape, num_classes=5)).eval()


def _keeps(sizes: list[int], seed: int) -> list[list[np.ndarray]]:
    """Random keeps, the last one keeping a single input unit (the most layers die)."""
    rng = np.random.default_rng(seed)
    out = []
    for trial in range(3):
        keep = [rng.random(n) < 0.5 for n in sizes]
        for k in keep:
            k[rng.integers(len(k))] = True
        if trial == 2:
            keep[0][:] = False
            keep[0][0] = True
        out.append(keep)
    return out


def test_input_units_are_what_the_first_layers_read() -> None:
    st = analyse(_model("mlp", (1, 6, 6)), torch.randn(2, 1, 6, 6), inputs="features")
    assert st.groups[0].kind == "input" and st.inputs is not None
    assert (st.inputs.unit, st.inputs.size) == ("element", 36)  # a pixel per unit
    st = analyse(_model("bilstm", (1, 6, 6)), torch.randn(2, 1, 6, 6), inputs="features")
    assert st.inputs is not None and (st.inputs.unit, st.inputs.size) == ("element", 6)  # a column
    assert st.inputs.members[0] == (0, 6, 12, 18, 24, 30)
    st = analyse(_model("deepsense", (6, 12)), torch.randn(2, 6, 12), inputs="sensors", sensors=SENSORS)
    assert st.inputs is not None and (st.inputs.unit, st.inputs.names) == ("channel", ("acc", "gyro"))
    assert st.inputs.members == ((0, 1, 2), (3, 4, 5))
    st = analyse(_model("mlp", (10,)), torch.randn(2, 10), inputs="features")
    assert st.inputs is not None and (st.inputs.unit, st.inputs.size) == ("feature", 10)
    st = analyse(_model("mlp", (10,)), torch.randn(2, 10))
    assert st.inputs is None and st.groups[0].kind == "linear"  # inputs=none: today's groups


@pytest.mark.parametrize(("name", "shape", "inputs", "sensors"), CASES)
def test_masked_model_equals_extracted_and_cost_counts_it_exactly(name, shape, inputs, sensors) -> None:
    model = _model(name, shape)
    x = torch.randn(5, *shape)
    st = analyse(model, x[:2], inputs=inputs, sensors=sensors)
    assert input_masking_problem(st) is None
    masked, state = masked_model(st)
    cm = cost_model(st)
    for keep in _keeps([g.size for g in st.groups], seed=len(shape)):
        small = extract(st, masked, keep)
        masks = [torch.as_tensor(k, dtype=torch.float32) for k in keep]
        assert check_extraction(masked, lambda m=masks: state.set(m), small, x, tol=1e-5) < 1e-5
        params, _ = cost(cm, [torch.as_tensor(k, dtype=torch.float64) for k in keep])
        assert int(params) == sum(p.numel() for p in small.parameters())
        n_kept = int(keep[0].sum())
        gathers = [m for m in small.modules() if isinstance(m, Gather)]
        if n_kept < st.inputs.size:  # the dropped inputs are never read
            assert gathers or name == "deepsense"  # deepsense may drop a whole branch instead
        state.set(masks)
        assert not torch.allclose(masked(x), model(x), atol=1e-4)  # the masks really act


def test_a_dropped_sensor_takes_its_branch_along() -> None:
    model = _model("deepsense", (6, 12))
    st = analyse(model, torch.randn(2, 6, 12), inputs="sensors", sensors=SENSORS)
    keep = [np.ones(g.size, bool) for g in st.groups]
    keep[0][1] = False  # no gyroscope
    small = extract(st, st.graph_module, keep)
    names = {n for n, _ in small.named_modules()}
    assert not any(n.startswith("branches.1") for n in names)  # the gyroscope branch is gone
    assert small.get_submodule("merge.0").in_channels == 32  # only the accelerometer's channels
    eff = effective_keep(cost_model(st), [torch.as_tensor(k, dtype=torch.float64) for k in keep])
    branch = [g.index for g in st.groups if g.module.startswith("branches.1")]
    assert branch and all(not eff[g].any() for g in branch)
    x = torch.randn(4, 6, 12)
    y = small(x)
    x[:, 3:] = torch.nan  # the gyroscope switched off: whatever it sends is never read
    assert torch.equal(small(x), y)


def test_dropping_inputs_lowers_the_cost_by_their_first_layer_weights() -> None:
    st = analyse(_model("mlp", (10,)), torch.randn(2, 10), inputs="features")
    cm = cost_model(st)
    keep = [torch.ones(g.size, dtype=torch.float64) for g in st.groups]
    full, full_macs = cost(cm, keep)
    keep[0][:4] = 0  # 4 inputs of 10, each with 300 weights into the first layer
    params, macs = cost(cm, keep)
    assert float(full - params) == 4 * 300 and float(full_macs - macs) == 4 * 300


def test_expected_cost_with_dead_branches_matches_sampled_costs() -> None:
    st = analyse(_model("deepsense", (6, 8)), torch.randn(2, 6, 8), inputs="sensors", sensors=SENSORS)
    cm = cost_model(st)
    g = torch.Generator().manual_seed(0)
    probs = [torch.rand(gr.size, generator=g, dtype=torch.float64) * 0.8 + 0.1 for gr in st.groups]
    samples = [torch.bernoulli(p.expand(4000, -1), generator=g) for p in probs]
    sampled = kept_fraction(cm, samples, "params").mean()
    expected = kept_fraction(cm, probs, "params", expected=True)
    assert abs(float(sampled) - float(expected)) < 0.01


class _Normalises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x * 2.0)))  # preprocessing inside the model


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.cat([torch.relu(self.fc1(x)), x], 1))  # the input skips a layer


class _TimeAsChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 3, 1), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C=2, T=4)
        return self.fc(torch.relu(self.conv(x.transpose(1, 2))).flatten(1))  # a column per step


def test_models_whose_inputs_cannot_be_masked_are_refused_with_the_reason() -> None:
    with pytest.raises(UnsupportedLayerError, match="changes the input values before the first layer"):
        analyse(_Normalises(), torch.randn(2, 4), inputs="features")
    with pytest.raises(UnsupportedLayerError, match="skip connection"):
        analyse(_Skip(), torch.randn(2, 4), inputs="features")
    analyse(_Skip(), torch.randn(2, 4))  # without input masking both are fine
    with pytest.raises(UnsupportedLayerError, match="reads sensors .* in one input feature"):
        analyse(_TimeAsChannels(), torch.randn(2, 2, 4), inputs="sensors", sensors=("a", "b"))


def test_gather_op_matches_torch_index_select() -> None:
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    for axis, idx in ((1, [4, 0, 2]), (2, [6]), (-1, [1, 3])):
        want = torch.index_select(torch.from_numpy(x), axis, torch.tensor(idx)).numpy()
        got = OPS["gather"]([x], {"axis": axis, "indices": idx}, {})
        np.testing.assert_array_equal(got, want)


def _masked_inputs_artifact(tmp_path: Path) -> tuple[Path, nn.Module, np.ndarray]:
    """An extracted deepsense with one gyroscope channel and two accelerometer channels dropped:
    a gather on both branches (features), as a written artifact with model.ts beside it."""
    model = _model("deepsense", (6, 12))
    st = analyse(model, torch.randn(2, 6, 12), inputs="features")
    keep = [np.ones(g.size, bool) for g in st.groups]
    keep[0][[0, 2, 4]] = False
    small = extract(st, st.graph_module, keep).eval()
    ex = export_graph(small, (6, 12))
    assert [o["op"] for o in ex.graph["ops"]].count("gather") == 2
    art = write_artifact(tmp_path, ex.graph, ex.arrays, {"model": "deepsense", "params": ex.params,
                                                          "macs": ex.macs, "input_shape": [6, 12]})
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is what small devices load
        warnings.simplefilter("ignore")
        torch.jit.trace(small, torch.zeros(1, 6, 12)).save(str(art.path / BACKEND_FILES["torch"]))
    x = np.random.default_rng(1).standard_normal((4, 6, 12)).astype(np.float32)
    return art.path, small, x


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("backend", ["numpy", "onnxruntime", "torch"])
def test_oracle_gathered_inputs_on_every_backend(tmp_path: Path, backend: str) -> None:
    path, small, x = _masked_inputs_artifact(tmp_path)
    with torch.no_grad():
        want = small(torch.from_numpy(x)).numpy()
    runner = BACKEND_CLASSES[backend](str(path))
    (got,) = runner.numpy_outputs(runner.run(runner.prepare(x)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    x[:, [0, 2, 4]] = 1e6  # the dropped channels: anything the device sends there is ignored
    (again,) = runner.numpy_outputs(runner.run(runner.prepare(x)))
    np.testing.assert_array_equal(again, got)


def test_onnx_converts_gather_to_gather(tmp_path: Path) -> None:
    path, small, x = _masked_inputs_artifact(tmp_path)
    import json

    graph = json.loads((path / "graph.json").read_text())
    with np.load(path / "weights.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    onnx_model = export_onnx(graph, arrays, x=x)  # checked against the numpy runtime
    import onnx

    ops = [n.op_type for n in onnx.load_from_string(onnx_model.data).graph.node]
    assert ops.count("Gather") >= 2
    shutil.rmtree(path)


def _flat(n: int = 384, features: int = 12) -> Dataset:
    """Flat (N, F) features; only features 0-3 carry the label."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, features)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) * 2 + (X[:, 2] - X[:, 3] > 0)
    return Dataset(name="flat", X_train=X[:256], y_train=y[:256], X_val=X[256:320], y_val=y[256:320],
                   X_test=X[320:], y_test=y[320:], num_classes=4, fingerprint="flat",
                   sensors=("a",) * 6 + ("b",) * 6, window_s=2.0)


@pytest.mark.parametrize("inputs", ["features", "sensors"])
def test_deepiot_masks_flat_features_end_to_end(inputs: str) -> None:
    from deepfleet.compressors.training import TrainConfig, train

    data = _flat()
    torch.manual_seed(0)
    model, _ = train(build_model("mlp", input_shape=(12,), num_classes=4), data, TrainConfig(epochs=2),
                     progress=False)
    deepiot = make_compressor("deepiot", {"target": 0.1, "iterations": 30, "eval_every": 15, "inputs": inputs})
    res = run_pipeline(model.eval(), data, [deepiot], ctx=quick_context())
    info = res.steps[0]["info"]["inputs"]
    assert info["mode"] == inputs and info["unit"] == "feature"
    assert 1 <= info["units_kept"] <= info["units"] == (12 if inputs == "features" else 2)
    assert info["sensors_kept"] and set(info["sensors_kept"]) <= {"a", "b"}
    assert res.steps[0]["info"]["extraction_error"] < 1e-4
    kept = info["inputs_kept"]
    x = torch.as_tensor(data.X_test[:8])
    y = res.model(x)
    x[:, [i for i in range(12) if i not in kept]] = 0.0
    assert torch.allclose(res.model(x), y)  # only the kept features are read


def test_sensors_on_data_without_sensor_names_is_one_clear_error(tiny_gru, tiny_sequences) -> None:
    deepiot = make_compressor("deepiot", {"target": 0.3, "iterations": 4, "inputs": "sensors"})
    with pytest.raises(ConfigError, match="needs the data to name each channel's sensor.*array 'sensors'"):
        run_pipeline(tiny_gru, tiny_sequences, [deepiot], ctx=quick_context())
    with pytest.raises(ConfigError, match="deepiot.inputs must be one of none, features, sensors"):
        make_compressor("deepiot", {"inputs": "pixels"})
    named = dataclasses.replace(tiny_sequences, sensors=SENSORS)
    assert named.sensors == SENSORS


def _sensor_npz(tmp_path: Path, **extra: object) -> str:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 6, 16)).astype(np.float32)
    y = (X[:, 0].mean(1) > 0).astype(np.int64) + 2 * (X[:, 1].mean(1) > 0)
    path = tmp_path / "sensors.npz"
    np.savez(path, X_train=X[:160], y_train=y[:160], X_val=X[160:200], y_val=y[160:200], X_test=X[200:],
             y_test=y[200:], **extra)
    return str(path)


def test_compress_writes_the_kept_inputs_and_sensors_into_the_manifest(tmp_path: Path) -> None:
    import json

    import deepfleet

    data = _sensor_npz(tmp_path, sensors=np.array(list(SENSORS)), sample_hz=np.float64(8.0))
    s = deepfleet.compress("deepsense", data=data, quick=True, progress=False, out=str(tmp_path / "out"),
                           settings={"deepiot": {"inputs": "sensors", "iterations": 12, "eval_every": 6}})
    small = json.loads((Path(s["artifact"]) / "manifest.json").read_text())
    orig = json.loads((Path(s["artifact_original"]) / "manifest.json").read_text())
    assert small["window_s"] == orig["window_s"] == 2.0  # 16 steps at 8 Hz
    assert orig["sensors_kept"] == ["acc", "gyro"] and orig["inputs_kept"] is None
    assert small["inputs_unit"] == "channel" and set(small["sensors_kept"]) <= {"acc", "gyro"}
    kept = {"acc": [0, 1, 2], "gyro": [3, 4, 5]}
    assert small["inputs_kept"] == sorted(i for name in small["sensors_kept"] for i in kept[name])
    assert s["sensors_kept"] == small["sensors_kept"]
    from deepfleet.cli._tables import compress_table

    line = next(ln for ln in compress_table(s).splitlines() if ln.startswith("inputs kept"))
    n = len(small["sensors_kept"])
    assert line == f"inputs kept      {n} of 2 sensors ({', '.join(small['sensors_kept'])}), {3 * n} of 6 channels"


def test_flat_features_with_a_model_that_needs_structure_is_one_clear_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deepfleet.cli import main

    rng = np.random.default_rng(0)
    path = tmp_path / "flat.npz"
    np.savez(path, X_train=rng.normal(size=(20, 8)), y_train=np.arange(20) % 2,
             X_test=rng.normal(size=(6, 8)), y_test=np.arange(6) % 2)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", "lenet5", "--data", str(path), "--out", str(out)])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.stderr
    assert "flat feature vectors of shape (8,); use the model 'mlp'" in lines[0]
    assert not out.exists()
