from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deepfleet
from deepfleet._onnx import run_onnx
from deepfleet.artifact import open_artifact
from deepfleet.device_agent.runtime import load_model

CLI = [sys.executable, "-m", "deepfleet.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("out")
    proc = run_cli("compress", "mlp", "--data", "digits", "--quick", "--json", "--out", str(out),
                   "--target-params", "0.05")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


def test_compress_json_has_the_promised_fields(quick_run) -> None:
    r, out = quick_run
    for key in ("model", "params_before", "params_after", "accuracy_before", "accuracy_after",
                "layers", "artifact", "artifact_original", "seconds", "bytes_before", "bytes_after"):
        assert key in r
    assert r["model"] == "mlp" and r["params_before"] == 266_610
    assert r["params_after"] <= 0.05 * r["params_before"]
    assert 0 <= r["accuracy_after"] <= 1 and 0 <= r["accuracy_before"] <= 1
    assert [row["name"] for row in r["layers"]] == ["net.1", "net.3", "net.5"]
    assert all(row["units_after"] <= row["units_before"] for row in r["layers"])
    assert r["layers"][-1]["units_after"] == 10  # the output layer is never pruned
    assert (out / "compress-mlp-digits-s0.json").exists()


def test_artifacts_run_in_the_device_runtime_like_torch(quick_run, digits) -> None:
    r, _ = quick_run
    small, orig = load_model(r["artifact"]), load_model(r["artifact_original"])
    x = digits.X_test[:50]
    manifest = json.loads((Path(r["artifact"]) / "manifest.json").read_text())
    assert manifest["params"] == r["params_after"] and manifest["model"] == "mlp"
    assert small.run(x).shape == orig.run(x).shape == (50, 10)
    # the runtime's predictions give the accuracy the summary reports (on the test split)
    pred = small.run(digits.X_test).argmax(1)
    assert abs(float((pred == digits.y_test).mean()) - r["accuracy_after"]) < 1e-9


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("out")
    proc = run_cli("compress", "mlp", "--data", "digits", "--quick", "--json", "--out", str(out),
                   "--target-params", "0.05", "--method", "deepiot,fixedpoint", "--bits", "8",
                   "--rounding", "stochastic", "--set", "fixedpoint.act_bits=12")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_pipeline_reports_its_methods_and_shrinks_the_artifact(quick_run, pipeline_run, digits) -> None:
    r, fp = quick_run[0], pipeline_run
    assert r["methods"] == ["deepiot"] and fp["methods"] == ["deepiot", "fixedpoint"]
    assert [s["method"] for s in fp["steps"]] == fp["methods"]
    assert fp["steps"][1]["info"]["settings"]["rounding"] == "stochastic"
    assert fp["steps"][1]["info"]["settings"]["act_bits"] == 12
    # the same DeepIoT result (same seed, quick schedule), then 8-bit codes instead of float32
    assert fp["params_after"] == r["params_after"]
    assert all(row["bits_per_weight"] == 8 for row in fp["layers"])
    assert fp["bytes_after"] < 0.4 * r["bytes_after"] and fp["bytes_before"] == r["bytes_before"]
    manifest = json.loads((Path(fp["artifact"]) / "manifest.json").read_text())
    assert manifest["compressor"]["methods"] == ["deepiot", "fixedpoint"]
    pred = load_model(fp["artifact"]).run(digits.X_test).argmax(1)
    assert abs(float((pred == digits.y_test).mean()) - fp["accuracy_after"]) < 1e-9


def test_model_onnx_beside_both_artifacts_predicts_what_torch_predicted(quick_run, pipeline_run, digits) -> None:
    for r, weights, acts in ((quick_run[0], "float32", "float32"),
                             (pipeline_run, "int8 QDQ", "fixed point as float ops")):
        small, orig = open_artifact(r["artifact"]), open_artifact(r["artifact_original"])  # verified
        assert small.manifest["onnx"]["weights"] == weights and small.manifest["onnx"]["activations"] == acts
        assert orig.manifest["onnx"]["weights"] == "float32"
        for art, acc in ((small, r["accuracy_after"]), (orig, r["accuracy_before"])):
            pred = run_onnx((art.path / "model.onnx").read_bytes(), digits.X_test)[0].argmax(1)
            # the summary's test accuracy, to one sample (a float32 argmax tie may fall otherwise)
            assert abs(float((pred == digits.y_test).mean()) - acc) <= 1 / len(digits.y_test) + 1e-9


def test_finetune_settings_reach_the_fine_tuning_and_the_manifest(tmp_path: Path) -> None:
    """``--set finetune.KEY=VALUE`` (distillation while fine-tuning, the mlp-inputs-kd recipe)."""
    proc = run_cli("compress", "mlp", "--data", "digits", "--quick", "--json", "--out", str(tmp_path),
                   "--target-params", "0.05", "--set", "finetune.kd_alpha=0.7", "--set", "finetune.epochs=1")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    manifest = json.loads((Path(r["artifact"]) / "manifest.json").read_text())
    finetune = manifest["compressor"]["finetune"]
    assert finetune["kd_alpha"] == 0.7 and finetune["epochs"] == 1


def test_second_run_reuses_the_cached_base_model(quick_run, tmp_path: Path, monkeypatch) -> None:
    import os

    r1 = deepfleet.compress("mlp", data="digits", quick=True, out=tmp_path / "a", progress=False)
    r2 = deepfleet.compress("mlp", data="digits", quick=True, out=tmp_path / "b", progress=False)
    assert not r1["base_cached"] and r2["base_cached"]
    assert r1["accuracy_before"] == r2["accuracy_before"]
    assert os.environ["DEEPFLEET_CACHE"]  # the test's private cache, not the user's


def test_deepear_on_audio_runs_end_to_end_and_its_artifact_runs_in_numpy(tmp_path: Path) -> None:
    proc = run_cli("compress", "deepear", "--data", "audio", "--quick", "--json", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["model"] == "deepear" and r["data"] == "audio" and r["params_before"] == 2_305_032
    assert r["params_after"] <= 0.05 * r["params_before"] and r["extraction_error"] < 1e-4
    assert [row["name"] for row in r["layers"]] == ["net.1", "net.3", "net.5", "net.7"]
    assert r["layers"][-1]["units_after"] == 8  # eight sound classes
    from deepfleet.data import load_data

    audio = load_data("audio")  # the subprocess cached it in this test's DEEPFLEET_CACHE
    pred = load_model(r["artifact"]).run(audio.X_test).argmax(1)
    assert abs(float((pred == audio.y_test).mean()) - r["accuracy_after"]) <= 1 / len(audio.y_test) + 1e-9


def test_an_unknown_data_set_lists_every_built_in_name(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deepfleet.cli import main

    res = CliRunner().invoke(main, ["compress", "mlp", "--data", "speech", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown data set 'speech'" in lines[0], res.stderr
    assert "use one of digits, sensing, sensing-user, audio or a path to an .npz file" in lines[0]


def _bad_npz(tmp_path: Path) -> str:
    p = tmp_path / "bad.npz"
    np.savez(p, X_train=np.zeros((4, 1, 8, 8)), y_train=np.arange(4))
    return str(p)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["resnet50", "--data", "digits"], "unknown model 'resnet50'"),
        (["mlp", "--data", "imagenet"], "unknown data set 'imagenet'"),
        (["mlp", "--data", "BAD"], "missing array(s) X_test, y_test"),
        (["mlp", "--data", "digits", "--target-params", "1.5"], "--target-params must be a kept fraction in (0, 1], but got 1.5"),
        (["mlp", "--data", "digits", "--target-params", "0"], "but got 0.0"),
        (["tests.test_cli_compress:unsupported_model", "--data", "digits"], "(LayerNorm) is not supported"),
        (["mlp", "--data", "digits", "--device", "cuda:7"], "--device"),
        (["mlp", "--data", "digits", "--method", "kmeans,deepiot"], "method 'deepiot' cannot follow 'kmeans'"),
        (["mlp", "--data", "digits", "--method", "deepiot,fixedpoint", "--bits", "1"],
         "fixedpoint supports bits in 2..16, but got 1"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    args = [a if a != "BAD" else _bad_npz(tmp_path) for a in args]
    out = tmp_path / "out"
    proc = run_cli("compress", *args, "--out", str(out), cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepfleet: error:"), proc.stderr
    assert needle in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["mlp", "--data", "digits", "--method", "deepiot,gzip"], "unknown compression method 'gzip'; accepted: deepiot"),
        (["mlp", "--data", "digits", "--method", "kmeans,deepiot"], "method 'deepiot' cannot follow 'kmeans'"),
        (["mlp", "--data", "digits", "--method", "binary,fixedpoint"], "cannot follow 'binary'"),
        (["mlp", "--data", "digits", "--method", "deepiot,fixedpoint", "--bits", "1"],
         "fixedpoint supports bits in 2..16, but got 1"),
        (["mlp", "--data", "digits", "--method", "kmeans", "--bits", "9"], "kmeans supports bits in 1..8, but got 9"),
        (["mlp", "--data", "digits", "--method", "binary", "--bits", "2"], "binary supports bits 1 only"),
        (["mlp", "--data", "digits", "--bits", "8"], "--bits applies to the quantisers"),
        (["mlp", "--data", "digits", "--method", "kmeans", "--rounding", "stochastic"], "--rounding applies to fixedpoint"),
        (["mlp", "--data", "digits", "--method", "fixedpoint", "--set", "fixedpoint.bitz=3"],
         "fixedpoint: unknown setting(s) bitz; accepted: bits"),
        (["mlp", "--data", "digits", "--method", "fixedpoint", "--set", "l1.target=0.1"],
         "settings given for l1, which the pipeline 'fixedpoint' does not run"),
        (["mlp", "--data", "digits", "--set", "deepiot"], "--set takes METHOD.KEY=VALUE"),
        (["mlp", "--data", "digits", "--set", "deepiot.inputs=sensors"],
         "deepiot.inputs=sensors needs the data to name each channel's sensor, but 'digits' names none"),
        (["mlp", "--data", "digits", "--set", "deepiot.inputs=pixels"],
         "deepiot.inputs must be one of none, features, sensors, but got 'pixels'"),
        (["mlp", "--data", "digits", "--method", "sparsesep", "--set", "sparsesep.atoms=2"],
         "sparsesep: atoms must be in (0, 1], but got 2"),
        (["mlp", "--data", "digits", "--method", "sparsesep", "--set", "sparsesep.sparsity=0"],
         "sparsesep: sparsity must be in (0, 1], but got 0"),
        (["mlp", "--data", "digits", "--method", "sparsesep", "--set", "sparsesep.rank=1.5"],
         "sparsesep: rank must be in (0, 1], but got 1.5"),
        (["mlp", "--data", "digits", "--method", "lowrank", "--set", "lowrank.params=0"],
         "lowrank: params must be in (0, 1], but got 0"),
        (["mlp", "--data", "digits", "--method", "sparsesep", "--target-macs", "0.1"], "give --target-params"),
        (["mlp", "--data", "digits", "--method", "sparsesep", "--bits", "4"], "--bits applies to the quantisers"),
        (["mlp", "--data", "digits", "--method", "sparsesep,fixedpoint"],
         "sparsesep is a factorisation into dictionaries and sparse codes, its codes are final"),
        (["mlp", "--data", "digits", "--method", "deepiot,temperature", "--set", "temperature.temperature=0"],
         "temperature: temperature must be a number in [0.05, 20.0] (or null to fit it on the validation split), "
         "but got 0"),
        (["mlp", "--data", "digits", "--method", "temperature,fixedpoint"],
         "method 'fixedpoint' cannot follow 'temperature'"),
        (["mlp", "--data", "digits", "--method", "rdeepsense", "--set", "rdeepsense.dropout=1"],
         "rdeepsense: dropout must be a rate in [0, 1), but got 1"),
        (["mlp", "--data", "digits", "--method", "dns", "--set", "dns.recurrent=maybe"],
         "dns: recurrent must be true or false, but got 'maybe'"),
        (["mlp", "--data", "digits", "--set", "finetune.kd_alfa=0.7"],
         "--set finetune.kd_alfa: not a fine-tuning setting; accepted: epochs, lr, patience, kd_alpha"),
        (["mlp", "--data", "digits", "--set", "finetune.kd_alpha=2"],
         "--set finetune: kd_alpha must be a weight in [0, 1] (0 = no distillation), but got 2"),
        (["mlp", "--data", "digits", "--set", "finetune.epochs=ten"],
         "--set finetune: epochs must be a whole number >= 0, but got 'ten'"),
        (["mlp", "--data", "digits", "--set", "finetune.views=-1"],
         "--set finetune: views must be a whole number >= 0, but got -1"),
        (["mlp", "--data", "digits", "--set", "finetune.work=0"],
         "--set finetune: work must be a positive number of multiply-accumulates (or null: no budget, epochs "
         "alone), but got 0"),
        (["mlp", "--data", "sensing-users"], "unknown data set 'sensing-users' given as data; use one of digits"),
    ],
)
def test_bad_pipelines_and_settings_fail_in_process_before_any_work(tmp_path: Path, args: list[str], needle: str) -> None:
    """The same checks through click in-process (a subprocess per case would cost seconds)."""
    from click.testing import CliRunner

    from deepfleet.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compress", *args, "--out", str(out)])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepfleet: error:") and needle in lines[0], res.stderr
    assert not out.exists()


def test_calibrated_pipeline_reports_calibration_and_deploys_the_temperature_op(tmp_path: Path, digits) -> None:
    proc = run_cli("compress", "mlp", "--data", "digits", "--quick", "--json", "--out", str(tmp_path),
                   "--method", "deepiot,fixedpoint,temperature", "--bits", "8")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["methods"] == ["deepiot", "fixedpoint", "temperature"]
    step = r["steps"][-1]["info"]
    assert step["fitted"] and step["val_after"]["nll"] <= step["val_before"]["nll"]
    for when in ("before", "after"):
        assert set(r["calibration_val"][when]) == {"ece", "nll", "brier"}
    assert r["calibration_val"]["after"]["nll"] == pytest.approx(step["val_after"]["nll"], rel=1e-5)
    graph = json.loads((Path(r["artifact"]) / "graph.json").read_text())
    assert graph["ops"][-1]["op"] == "temperature" and graph["ops"][-1]["attrs"]["value"] == step["temperature"]
    assert {t["encoding"] for t in graph["tensors"].values()} >= {"fixed"}  # the 8-bit codes survive
    pred = load_model(r["artifact"]).run(digits.X_test).argmax(1)
    assert abs(float((pred == digits.y_test).mean()) - r["accuracy_after"]) < 1e-9
    onnx = run_onnx((Path(r["artifact"]) / "model.onnx").read_bytes(), digits.X_test[:64])[0]
    assert (onnx.argmax(1) == pred[:64]).all()


def test_magnitude_artifact_bytes_shrink_with_what_was_pruned(tmp_path: Path, digits) -> None:
    proc = run_cli("compress", "mlp", "--data", "digits", "--quick", "--json", "--out", str(tmp_path),
                   "--method", "magnitude", "--target-params", "0.05")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["kept_params"] == pytest.approx(0.05, abs=0.002)
    assert r["bytes_after"] < 0.1 * r["bytes_before"]  # ~5 bytes per kept weight, not 4 per weight
    graph = json.loads((Path(r["artifact"]) / "graph.json").read_text())
    assert {t["encoding"] for n, t in graph["tensors"].items() if n.endswith(".weight")} == {"sparse"}
    pred = load_model(r["artifact"]).run(digits.X_test).argmax(1)  # decoded exactly
    assert abs(float((pred == digits.y_test).mean()) - r["accuracy_after"]) < 1e-9


def unsupported_model(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.LayerNorm(32),
                               torch.nn.Linear(32, num_classes))
