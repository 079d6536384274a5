"""The compressors by name, built from plain settings, and the rules of a pipeline's order."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from deepfleet.compressors._binary import Binary
from deepfleet.compressors._calibrate import RDeepSense, Temperature
from deepfleet.compressors._codebook import KMeans, ProductQuantiser, ResidualQuantiser
from deepfleet.compressors._fixedpoint import FixedPoint
from deepfleet.compressors._lowrank import LowRank
from deepfleet.compressors._sparse import DNS, Magnitude
from deepfleet.compressors._sparsesep import SparseSep
from deepfleet.compressors._structured import L1, DeepIoT
from deepfleet.compressors.base import STAGES, BaseCompressor
from deepfleet.errors import ConfigError

REGISTRY: dict[str, type[BaseCompressor]] = {
    c.name: c
    for c in (DeepIoT, L1, LowRank, RDeepSense, Magnitude, DNS, FixedPoint, KMeans, ProductQuantiser,
              ResidualQuantiser, Binary, SparseSep, Temperature)
}


def compressor_names() -> list[str]:
    return list(REGISTRY)


def _by_stage(stage: str) -> str:
    return ", ".join(n for n, c in REGISTRY.items() if c.stage == stage)


ORDER = (
    f"structural methods ({_by_stage('structure')}), then sparsity ({_by_stage('sparsity')}), "
    f"then at most one method with final codes, a quantiser or SparseSep ({_by_stage('quantise')}), "
    f"then at most one calibration "
    f"({_by_stage('calibrate')}), e.g. deepiot,fixedpoint,temperature"
)


def compressor_class(name: str) -> type[BaseCompressor]:
    """The class registered as ``name``; ConfigError naming the accepted methods otherwise."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown compression method {name!r}; accepted: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def make_compressor(name: str, settings: Mapping[str, Any] | None = None) -> BaseCompressor:
    """Build compressor ``name`` from plain settings (its config's fields); ConfigError for an
    unknown method, an unknown setting or a bad value."""
    cls = compressor_class(name)
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(settings or {}) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(fields)}")
    try:
        config = cls.config_class(**dict(settings or {}))
    except TypeError as exc:  # e.g. a wrong type that __post_init__ could not compare
        raise ConfigError(f"{name}: bad settings {dict(settings or {})!r}: {exc}") from None
    return cls(config)


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"deepiot,fixedpoint"``, ``"deepiot+fixedpoint"`` (a study's spelling) or a list ->
    ["deepiot", "fixedpoint"], checked as a pipeline."""
    names = ([s.strip() for s in spec.replace("+", ",").split(",")] if isinstance(spec, str)
             else [str(s).strip() for s in spec])
    if not names or any(not n for n in names):
        raise ConfigError(f"--method must be a comma list of methods, but got {spec!r}; accepted: {', '.join(REGISTRY)}")
    check_pipeline(names)
    return names


def check_pipeline(names: Sequence[str]) -> None:
    """Raise ConfigError unless ``names`` is a pipeline that can work: see :data:`ORDER`.

    A quantiser's codes are final (nothing after it may change float weights, only a
    calibration, which changes none), structural methods retrain and reshape float weights (so
    they come before sparsity, whose zeros later steps must keep), and a quantiser after a
    sparsity method must keep exact zeros. A calibration comes last.
    """
    if not names:
        raise ConfigError(f"give at least one compression method; accepted: {', '.join(REGISTRY)}")
    classes = [compressor_class(n) for n in names]
    for prev, cur in zip(classes, classes[1:]):
        if prev.stage == "calibrate":
            raise ConfigError(
                f"method {cur.name!r} cannot follow {prev.name!r} in {','.join(names)!r}: {prev.name} "
                f"calibrates the finished model and comes last; a pipeline runs {ORDER}"
            )
        if prev.stage == "quantise" and cur.stage != "calibrate":
            raise ConfigError(
                f"method {cur.name!r} cannot follow {prev.name!r} in {','.join(names)!r}: {prev.name} "
                f"is {prev.label}, its codes are final and {cur.name} would need float weights; "
                f"a pipeline runs {ORDER}"
            )
        if STAGES.index(cur.stage) < STAGES.index(prev.stage):
            raise ConfigError(
                f"method {cur.name!r} ({cur.stage}) cannot follow {prev.name!r} ({prev.stage}) in "
                f"{','.join(names)!r}: it would retrain and reshape the weights and lose what "
                f"{prev.name} did; a pipeline runs {ORDER}"
            )
    sparse = [c.name for c in classes if c.stage == "sparsity"]
    quant = [c for c in classes if c.stage == "quantise"]
    if sparse and quant and not quant[0].keeps_zeros:
        keepers = ", ".join(n for n, c in REGISTRY.items() if c.stage == "quantise" and c.keeps_zeros)
        raise ConfigError(
            f"method {quant[0].name!r} cannot follow {sparse[-1]!r}: it does not keep pruned weights "
            f"at zero; after a sparsity method use one of {keepers}"
        )
