"""A trial's flat parameters become a compression pipeline (no Ray: the task's function itself)."""

from __future__ import annotations

import json

import pytest

from deepfleet.errors import ConfigError
from deepfleet.orchestrator.trainer import compress_settings, train_candidate

PARAMS = {"method": "deepiot+fixedpoint", "deepiot.target": 0.1, "deepiot.iterations": 30,
          "deepiot.eval_every": 30, "fixedpoint.bits": 4, "fixedpoint.rounding": "stochastic",
          "l1.target": 0.5}


def test_settings_follow_the_chosen_pipeline_only() -> None:
    s = compress_settings(PARAMS, {"finetune_epochs": 2})
    assert s["method"] == ["deepiot", "fixedpoint"]
    assert s["settings"] == {"deepiot": {"target": 0.1, "iterations": 30, "eval_every": 30},
                             "fixedpoint": {"bits": 4, "rounding": "stochastic"}}
    assert s["finetune"].epochs == 2
    with pytest.raises(ConfigError, match="unknown compression method 'prune'"):
        compress_settings({"method": "prune"}, {})


def test_a_pipeline_trial_quantises_what_deepiot_kept() -> None:
    r = train_candidate({"model": "mlp", "data": "digits", "seed": 0, "params": PARAMS,
                         "training": {"finetune_epochs": 1}})
    assert r["method"] == "deepiot+fixedpoint"
    assert 0.05 < r["kept_params"] < 0.2
    manifest = json.loads(r["files"]["manifest.json"])
    steps = {s["method"]: s["settings"] for s in manifest["compressor"]["steps"]}
    assert steps["fixedpoint"]["bits"] == 4 and steps["fixedpoint"]["rounding"] == "stochastic"
    # 4-bit codes: the weights take about an eighth of float32's bytes
    assert len(r["files"]["weights.npz"]) < 0.25 * 4 * r["params"]
    assert r["bytes"] < r["bytes_base"] * 0.1 * 0.5
