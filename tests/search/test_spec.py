from __future__ import annotations

import re
from pathlib import Path

import pytest

from deepfleet.errors import ConfigError
from deepfleet.search._spec import load_study, parse_study

GOOD = """
name: demo
model: lenet5
data: digits
classes: [local, edison]
space:
  method: [deepiot, deepiot+fixedpoint]
  deepiot.target: {low: 0.005, high: 0.1, log: true}
  deepiot.iterations: 600
  fixedpoint.bits: [4, 8]
objectives:
  - accuracy
  - {metric: latency_p50, class: edison}
  - bytes
constraints:
  - {metric: accuracy_drop_pp, max: 0.5}
  - {metric: latency_p90, class: local, max: 5}
trials: 12
resources: {cpu: 1, gpu: 0.25}
"""


def test_a_complete_study_file_loads(tmp_path: Path) -> None:
    p = tmp_path / "study.yaml"
    p.write_text(GOOD)
    s = load_study(p)
    assert s.directions == ["maximize", "minimize", "minimize"]
    assert [o.label for o in s.objectives] == ["accuracy", "latency_p50@edison", "bytes"]
    assert s.constraints[1].label == "latency_p90@local<=5"
    by_name = {p.name: p for p in s.space}
    assert by_name["deepiot.target"].log and not by_name["deepiot.target"].integer
    assert by_name["deepiot.iterations"].fixed and by_name["method"].choices == ("deepiot", "deepiot+fixedpoint")
    assert s.resources.gpu == 0.25 and s.needs_devices


def test_defaults_without_space_or_objectives() -> None:
    s = parse_study({"name": "x", "model": "mlp", "data": "digits"})
    assert [p.name for p in s.space] == ["method"] and s.space[0].value == "deepiot"
    assert [o.metric for o in s.objectives] == ["accuracy", "bytes"] and not s.needs_devices


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"epochs": 3}, "epochs: unknown key; accepted keys:"),
        ({"objectives": ["speed"]}, "unknown metric 'speed'; accepted: accuracy"),
        ({"objectives": [{"metric": "latency_p50", "class": "pi"}]}, "unknown device class 'pi'"),
        ({"objectives": [{"metric": "latency_p50"}], "classes": ["a", "b"]}, "add class: one of a, b"),
        ({"objectives": [{"metric": "bytes", "class": "local"}]}, "does not depend on a device class"),
        ({"objectives": [{"metric": "bytes", "direction": "up"}]}, "accepted: minimize, maximize"),
        ({"constraints": [{"metric": "bytes"}]}, "needs max"),
        ({"space": {"deepiot.target": {"low": 0.5, "high": 0.1}}}, "`low <= high` must hold, but got (low=0.5, high=0.1)"),
        ({"space": {"deepiot.target": {"low": 0, "high": 0.1, "log": True}}}, "log range needs low > 0"),
        ({"space": {"x": []}}, "empty list"),
        ({"sampler": "cmaes"}, "accepted: auto, tpe, nsga2, random"),
        ({"trials": 0}, "trials: must be >= 1"),
        ({"resources": {"tpu": 1}}, "resources.tpu: unknown; accepted: cpu, gpu"),
        ({"measure": {"repeats": 3}}, "measure.repeats: unknown"),
        ({"measure": {"backend": "tflite"}}, "measure.backend: got 'tflite'; accepted: auto, numpy, onnxruntime, torch"),
        ({"space": {"method": ["deepiot", "prune"]}}, "space.method: 'prune': unknown compression method 'prune'; accepted: deepiot"),
        ({"space": {"method": "fixedpoint+deepiot"}}, "space.method: 'fixedpoint+deepiot'"),
        ({"space": {"fixedpoint.bits": [4, 8]}}, "space.fixedpoint.bits: a setting is METHOD.SETTING for a method in space.method (offered: deepiot) or finetune.SETTING"),
        ({"space": {"finetune.kd_alfa": [0.0, 0.7]}},
         "space.finetune.kd_alfa: not a fine-tuning setting; accepted: epochs, lr, patience, kd_alpha"),
        ({"space": {"method": "deepiot+fixedpoint", "fixedpoint.width": 8}}, "fixedpoint has no setting 'width'; accepted: bits"),
        ({"space": {"deepiot.inputs": ["none", "pixels"]}}, "space.deepiot.inputs: got 'pixels'; accepted: none, features, sensors"),
        ({"space": {"deepiot.inputs": ["none", "sensors"]}},
         "space.deepiot.inputs: sensors needs the data to name each channel's sensor, but 'digits' names none"),
    ],
)
def test_bad_study_files_name_file_key_value_and_what_is_accepted(change: dict, needle: str) -> None:
    raw = {"name": "x", "model": "mlp", "data": "digits", **change}
    with pytest.raises(ConfigError) as err:
        parse_study(raw, "study.yaml")
    assert str(err.value).startswith("study.yaml: ")
    assert needle in str(err.value)


def test_the_space_may_set_the_fine_tuning() -> None:
    spec = parse_study({"name": "x", "model": "mlp", "data": "digits",
                        "space": {"deepiot.inputs": ["none", "features"], "finetune.kd_alpha": [0.0, 0.7]}})
    assert {p.name: p.choices for p in spec.space}["finetune.kd_alpha"] == (0.0, 0.7)


def test_missing_or_unparsable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)


def test_measure_section_reaches_the_agent_request() -> None:
    from deepfleet.orchestrator._session import measure_settings as _measure_settings

    spec = parse_study({"name": "x", "model": "mlp", "data": "digits",
                        "measure": {"min_runs": 7, "max_runs": 10**8, "min_seconds": 3.0, "max_seconds": 4.0}})
    request = _measure_settings(spec).request
    assert (request["min_runs"], request["max_runs"], request["min_seconds"], request["max_seconds"]) == (7, 10**8, 3.0, 4.0)
    assert spec.measure.backend == "auto" and request["backend"] == "auto"  # the default
    numpy = parse_study({"name": "x", "model": "mlp", "data": "digits", "measure": {"backend": "numpy"}})
    settings = _measure_settings(numpy)
    assert settings.request["backend"] == "numpy" and settings.reference()["backend"] == "numpy"


def test_base_keys_are_checked_and_relative_to_the_study_file(tmp_path: Path) -> None:
    (tmp_path / "base.pt").write_bytes(b"")
    spec = parse_study({"name": "x", "model": "mlp", "data": "digits",
                        "base": {"checkpoint": "base.pt", "epochs": 5}}, str(tmp_path / "study.yaml"))
    assert spec.base_checkpoint == str(tmp_path / "base.pt") and spec.base_epochs == 5
    with pytest.raises(ConfigError, match=r"base.checkpoint: '.*nope.pt' does not exist"):
        parse_study({"name": "x", "model": "mlp", "data": "digits", "base": {"checkpoint": "nope.pt"}},
                    str(tmp_path / "study.yaml"))
    with pytest.raises(ConfigError, match="base.epochs: must be >= 1"):
        parse_study({"name": "x", "model": "mlp", "data": "digits", "base": {"epochs": 0}})


@pytest.mark.parametrize(("search", "needle"), [
    ({"predictor": "oracle"}, "search.predictor: got 'oracle'; accepted: linear, kernel, forest, hybrid"),
    ({"audit_rejections": 1.5}, "search.audit_rejections: got 1.5; expected a share in [0, 1]"),
    ({"audit": 0.1}, "search.audit: unknown; accepted: predictor, audit_rejections"),
])
def test_the_search_section_names_the_key_and_what_is_accepted(search: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_study({"name": "x", "model": "mlp", "data": "digits", "search": search})
    ok = parse_study({"name": "x", "model": "mlp", "data": "digits", "search": {"predictor": "forest",
                                                                                "audit_rejections": 0}})
    assert ok.judging.predictor == "forest" and ok.judging.audit_rejections == 0.0


def test_inputs_are_a_searchable_deepiot_setting_in_the_conditional_space() -> None:
    import optuna

    from deepfleet.search import suggest

    spec = parse_study({"name": "x", "model": "deepsense", "data": "sensing",
                        "space": {"method": ["deepiot", "l1"], "deepiot.inputs": ["none", "sensors"]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        params = suggest(study.ask(), spec.space)
        if params["method"] == "deepiot":
            seen.add(params["deepiot.inputs"])
        else:
            assert "deepiot.inputs" not in params  # l1 trials do not draw it
    assert seen == {"none", "sensors"}


def test_sensing_metrics_need_named_sensors_a_window_and_every_devices_power(tmp_path: Path) -> None:
    from deepfleet.search import check_sensing

    def study(data: str) -> object:
        return parse_study({"name": "x", "model": "mlp", "data": data, "classes": ["pi"],
                            "objectives": ["accuracy", {"metric": "energy_total", "class": "pi"}]}, "s.yaml")

    both = {"accelerometer", "gyroscope"}
    check_sensing(study("sensing"), {"pi": {"pi-1": both, "pi-2": both | {"mic"}}})
    with pytest.raises(ConfigError, match=r"s.yaml: objectives\[1\]: energy_total needs the power of every sensor.*"
                                          r"device 'pi-2' gives none for gyroscope; add sensors: \{gyroscope"):
        check_sensing(study("sensing"), {"pi": {"pi-1": both, "pi-2": {"accelerometer"}}})
    with pytest.raises(ConfigError, match="'digits' names none; add an array 'sensors'"):
        check_sensing(study("digits"), {"pi": {"pi-1": both}})
    import numpy as np

    npz = tmp_path / "d.npz"
    np.savez(npz, X_train=np.zeros((4, 2)), y_train=np.arange(4) % 2, X_test=np.zeros((2, 2)),
             y_test=np.arange(2), sensors=np.array(["a", "b"]))
    with pytest.raises(ConfigError, match="gives none; add a scalar 'sample_hz'"):
        check_sensing(study(str(npz)), {"pi": {"pi-1": {"a", "b"}}})
