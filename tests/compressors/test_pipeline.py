"""The compressor interface: registry, settings, pipeline order, composition, and the contract
every registered method must meet (the numpy runtime reproduces its torch model)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from deepfleet.compressors import (
    REGISTRY,
    STAGES,
    BaseCompressor,
    check_pipeline,
    make_compressor,
    parse_methods,
    run_pipeline,
)
from deepfleet.errors import ConfigError
from tests.conftest import quick_context, runtime_error

# Settings that keep every method to about a second on the tiny models.
QUICK = {
    "deepiot": {"target": 0.3, "iterations": 12, "eval_every": 6},
    "l1": {"target": 0.3},
    "lowrank": {"params": 0.5},
    "magnitude": {"target": 0.3, "steps": 1},
    "dns": {"target": 0.3, "update_every": 2},
    "fixedpoint": {"bits": 6},
    "kmeans": {"bits": 3},
    "pq": {"bits": 3, "dim": 2},
    "rq": {"bits": 3, "dim": 2},
    "binary": {},
    "sparsesep": {"target": 0.3, "iterations": 2},
    "rdeepsense": {"dropout": 0.2, "samples": 3},
    "temperature": {},
}


def test_every_method_is_registered_with_a_stage_and_a_frozen_keyword_only_config() -> None:
    assert set(REGISTRY) == set(QUICK)
    for name, cls in REGISTRY.items():
        assert issubclass(cls, BaseCompressor) and cls.name == name and cls.stage in STAGES
        cfg = cls.config_class()
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.__setattr__("epochs", 3)
        with pytest.raises(TypeError):  # keyword-only
            cls.config_class(1)


@pytest.mark.parametrize("name", sorted(QUICK))
def test_contract_every_method_runs_exports_and_the_runtime_reproduces_torch(name: str, tiny_case) -> None:
    model, data = tiny_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_pipeline(model, data, [make_compressor(name, QUICK[name])], ctx=quick_context())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert res.methods == [name]
    json.dumps(res.steps)  # plain data only
    assert "settings" in res.steps[0]["info"] and "layers" in res.steps[0]["info"]
    quantiser = REGISTRY[name].stage == "quantise"
    assert bool(res.encodings) == quantiser
    err, out, ref = runtime_error(res.model, res.encodings, data)
    assert err < 1e-5, f"{name}: runtime differs from torch by {err:.2e}"
    assert (out.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize(
    ("methods", "needle"),
    [
        ("deepiot,fixedpoint", None),
        ("l1,lowrank,magnitude,fixedpoint", None),
        ("dns,kmeans", None),
        ("fixedpoint,deepiot", "method 'deepiot' cannot follow 'fixedpoint'"),
        ("kmeans,l1", "kmeans is a quantiser, its codes are final"),
        ("binary,magnitude", "cannot follow 'binary'"),
        ("fixedpoint,kmeans", "cannot follow 'fixedpoint'"),
        ("magnitude,deepiot", "method 'deepiot' (structure) cannot follow 'magnitude' (sparsity)"),
        ("magnitude,binary", "'binary' cannot follow 'magnitude': it does not keep pruned weights at zero"),
        ("dns,pq", "after a sparsity method use one of fixedpoint, kmeans"),
        ("deepiot,zip", "unknown compression method 'zip'; accepted: deepiot, l1, lowrank"),
        ("deepiot,,fixedpoint", "comma list"),
    ],
)
def test_pipeline_order_rules(methods: str, needle: str | None) -> None:
    if needle is None:
        assert parse_methods(methods) == methods.split(",")
        return
    with pytest.raises(ConfigError) as err:
        parse_methods(methods)
    assert needle in str(err.value)
    assert "structural methods (deepiot, l1, lowrank, rdeepsense)" in str(err.value) or "accepted" in str(err.value) \
        or "use one of" in str(err.value) or "comma list" in str(err.value)


def test_a_bad_order_fails_before_any_work(tiny_cnn, tiny_digits) -> None:
    class Exploding(BaseCompressor):
        name, stage, config_class = "deepiot", "structure", dict  # posing as deepiot

        def compress(self, model, data, ctx):  # type: ignore[no-untyped-def]
            raise AssertionError("ran before the order was checked")

    with pytest.raises(ConfigError):
        run_pipeline(tiny_cnn, tiny_digits, [make_compressor("binary"), Exploding({})], ctx=quick_context())
    with pytest.raises(ConfigError):
        check_pipeline([])


def test_deepiot_then_fixed_point_composes_and_the_device_decodes_the_same_codes(tiny_cnn, tiny_digits) -> None:
    res = run_pipeline(tiny_cnn, tiny_digits, [make_compressor("deepiot", QUICK["deepiot"]),
                                                make_compressor("fixedpoint", {"bits": 8})], ctx=quick_context())
    assert res.methods == ["deepiot", "fixedpoint"]
    small = dict(res.model.named_parameters())
    n_before = sum(p.numel() for p in tiny_cnn.parameters())
    assert sum(p.numel() for p in small.values()) <= 0.31 * n_before  # pruned by DeepIoT ...
    for name, enc in res.encodings.items():  # ... and its weights are 8-bit codes
        assert enc.kind == "fixed" and enc.arrays["codes"].dtype == np.int8
        assert np.array_equal(enc.decode(), small[name].detach().numpy())
    err, _, _ = runtime_error(res.model, res.encodings, tiny_digits)
    assert err < 1e-5
    assert res.steps[0]["info"]["kept_params"] < 0.5


def test_encodings_of_a_modified_model_are_refused_by_the_exporter(tiny_cnn, tiny_digits) -> None:
    from deepfleet.compressors import export_graph
    from deepfleet.errors import ModelError

    res = make_compressor("fixedpoint", {"bits": 4, "training": "none"}).compress(tiny_cnn, tiny_digits, quick_context())
    with torch.no_grad():
        res.model.fc1.weight.add_(1e-3)
    with pytest.raises(ModelError, match="'fc1.weight' differs from its fixed encoding"):
        export_graph(res.model, tiny_digits.input_shape, res.encodings)
