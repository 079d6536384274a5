"""A trial's flat parameters become a compression pipeline (no Ray: the task's function itself)."""

from __future__ import annotations

import pytest

from deepfleet.errors import ConfigError
from deepfleet.orchestrator.trainer import TrainJob, compress_settings, train_candidate

PARAMS = {"method": "deepiot+fixedpoint", "deepiot.target": 0.1, "deepiot.iterations": 30,
          "deepiot.eval_every": 30, "fixedpoint.bits": 4, "fixedpoint.rounding": "stochastic",
          "l1.target": 0.5}


def test_settings_follow_the_chosen_pipeline_only() -> None:
    s = compress_settings(PARAMS, {"finetune_epochs": 2})
    assert s["method"] == ["deepiot", "fixedpoint"]
    assert s["settings"] == {"deepiot": {"target": 0.1, "iterations": 30, "eval_every": 30},
                             "fixedpoint": {"bits": 4, "rounding": "stochastic"}}
    assert s["finetune"].epochs == 2
    # the fine-tuning's own settings (a study's space: finetune.kd_alpha) travel beside the methods'
    s = compress_settings({**PARAMS, "finetune.kd_alpha": 0.7, "finetune.epochs": 3}, {"finetune_epochs": 2})
    assert s["settings"]["finetune"] == {"kd_alpha": 0.7, "epochs": 3} and set(s["settings"]) == {
        "deepiot", "fixedpoint", "finetune"}
    with pytest.raises(ConfigError, match="unknown compression method 'prune'"):
        compress_settings({"method": "prune"}, {})


def test_a_pipeline_trial_quantises_what_deepiot_kept() -> None:
    r = train_candidate(TrainJob(model="mlp", data="digits", params={**PARAMS, "finetune.kd_alpha": 0.5},
                                 training={"finetune_epochs": 1}))
    c = r.candidate
    assert c.method == "deepiot+fixedpoint" and c.artifact_hash == r.artifact.digest
    assert 0.05 < c.kept_params < 0.2
    steps = {s["method"]: s["settings"] for s in r.artifact.manifest["compressor"]["steps"]}
    assert steps["fixedpoint"]["bits"] == 4 and steps["fixedpoint"]["rounding"] == "stochastic"
    finetune = r.artifact.manifest["compressor"]["finetune"]
    assert finetune["kd_alpha"] == 0.5 and finetune["epochs"] == 1  # the space's and training's
    # 4-bit codes: the weights take about an eighth of float32's bytes
    assert len(r.artifact.files["weights.npz"]) < 0.25 * 4 * c.params
    assert c.bytes == r.artifact.bytes
    assert {lay.name for lay in c.layers if lay.pruned} and all(lay.units_after <= lay.units_before for lay in c.layers)


def test_a_given_base_checkpoint_is_the_original(tmp_path) -> None:
    import torch

    from deepfleet.api import BaseSpec
    from deepfleet.compressors.training import accuracy
    from deepfleet.data import load_data
    from deepfleet.errors import ModelError
    from deepfleet.models import build_model
    from deepfleet.orchestrator.trainer import train_base

    data = load_data("digits")
    torch.manual_seed(7)
    untrained = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes).eval()
    path = tmp_path / "base.pt"
    torch.save(untrained.state_dict(), path)
    r = train_base(TrainJob(model="mlp", data="digits", base=BaseSpec(checkpoint=str(path))))
    assert r.cached and r.candidate.method == "none"
    assert r.candidate.accuracy_val == accuracy(untrained, data.X_val, data.y_val)  # not trained: near chance
    torch.save({"wrong": torch.zeros(3)}, path)
    with pytest.raises(ModelError, match="does not fit model 'mlp'"):
        train_base(TrainJob(model="mlp", data="digits", base=BaseSpec(checkpoint=str(path))))
