"""``study.yaml``: what to search, how to judge it, where to run it. Validated on load.

Example::

    name: lenet5-digits
    model: lenet5
    data: digits
    space:
      method: [deepiot, deepiot+fixedpoint]     # a list is a choice
      deepiot.target: {low: 0.005, high: 0.1, log: true}
      deepiot.iterations: 600                  # a scalar is fixed
      fixedpoint.bits: [4, 6, 8]
    objectives: [accuracy, {metric: latency_p50, class: local}, bytes]
    constraints: [{metric: accuracy_drop_pp, max: 0.5}]
    trials: 10

Every error names the file, the key, the bad value and what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepfleet.device_agent.protocol import BACKEND_CHOICES
from deepfleet.errors import ConfigError, DeepfleetError
from deepfleet.metrics import METRICS
from deepfleet.search._predictor import DEFAULT_PREDICTOR, PREDICTORS

SAMPLERS = ("auto", "tpe", "nsga2", "random")
_TOP = {
    "name", "model", "data", "seed", "base", "space", "objectives", "constraints", "trials",
    "parallelism", "resources", "fleet", "classes", "storage", "sampler", "sampler_seed", "measure",
    "training", "search",
}



@dataclass(frozen=True, kw_only=True)
class Param:
    """One dimension of the search space: a choice, a range, or a fixed value."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False
    value: Any = None

    @property
    def fixed(self) -> bool:
        return self.choices is None and self.low is None


@dataclass(frozen=True, kw_only=True)
class Objective:
    metric: str
    direction: str
    device_class: str | None = None

    @property
    def unit(self) -> str:
        return METRICS[self.metric].unit

    @property
    def label(self) -> str:
        """The objective's display name (Optuna's metric name), e.g. ``latency_p50@edison``."""
        return f"{self.metric}@{self.device_class}" if self.device_class else self.metric


@dataclass(frozen=True, kw_only=True)
class Constraint:
    metric: str
    max: float
    device_class: str | None = None

    @property
    def label(self) -> str:
        """The constraint's display name (Optuna's constraint key), e.g. ``bytes<=1000``."""
        return f"{self.metric}@{self.device_class}<={self.max:g}" if self.device_class else f"{self.metric}<={self.max:g}"


@dataclass(frozen=True, kw_only=True)
class StudyMeasure:
    """The study's ``measure:`` section (mapped onto the agent's measure request)."""

    warmup: int = 5
    min_runs: int = 20
    max_runs: int = 10000  # a bound before min_seconds: a 10 us model reaches it in 0.1 s
    min_seconds: float = 0.3
    max_seconds: float = 10.0
    batch: int = 1
    threads: int = 1
    devices: int = 1  # distinct devices per class each candidate is measured on (class median)
    reference_every: int = 10  # re-measure the reference model every N measurements (drift)
    # the runtime: auto = the first of each device's `backends:` (fleet file) that is installed
    # there and that the artifact has; or numpy / onnxruntime / torch on every device
    backend: str = "auto"


@dataclass(frozen=True, kw_only=True)
class Judging:
    """The study's ``search:`` section: how the judge predicts before measuring.

    ``predictor``: the model that predicts device metrics (see ``search/_predictor.py``);
    ``audit_rejections``: the share of candidates rejected on a prediction that are measured
    anyway, to count false rejections (0: never, 1: every one)."""

    predictor: str = DEFAULT_PREDICTOR
    audit_rejections: float = 0.1


@dataclass(frozen=True, kw_only=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0  # fractional GPUs allowed: small compressions are host-bound


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    name: str
    model: str
    data: str
    seed: int = 0
    base_checkpoint: str | None = None
    base_epochs: int = 60
    space: tuple[Param, ...] = ()
    objectives: tuple[Objective, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    trials: int = 10
    parallelism: int = 2
    resources: Resources = field(default_factory=Resources)
    fleet: str | None = None
    classes: tuple[str, ...] = ("local",)
    storage: str | None = None
    sampler: str = "auto"
    sampler_seed: int | None = None  # default: seed
    measure: StudyMeasure = field(default_factory=StudyMeasure)
    training: dict[str, Any] = field(default_factory=dict)  # e.g. finetune_epochs
    judging: Judging = field(default_factory=Judging)
    source: str = "<dict>"

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def device_classes(self) -> tuple[str, ...]:
        """The classes a candidate must be measured on: those of device objectives and
        constraints, in the order of ``classes``."""
        used = {x.device_class for x in (*self.objectives, *self.constraints) if x.device_class}
        return tuple(c for c in self.classes if c in used)

    @property
    def needs_devices(self) -> bool:
        return bool(self.device_classes)


def _err(src: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"{src}: {key}: {msg}")


def _expect(src: str, key: str, value: Any, types: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _err(src, key, f"got {value!r}; expected {what}")
    if not isinstance(value, types):
        raise _err(src, key, f"got {value!r}; expected {what}")
    return value


def _param(src: str, name: str, raw: Any) -> Param:
    key = f"space.{name}"
    if isinstance(raw, list):
        if not raw:
            raise _err(src, key, "an empty list offers nothing to choose; give at least one value")
        return Param(name=name, choices=tuple(raw))
    if isinstance(raw, dict):
        unknown = set(raw) - {"low", "high", "log", "step", "int"}
        if unknown:
            raise _err(src, key, f"unknown field(s) {sorted(unknown)}; a range accepts low, high, log, step, int")
        if "low" not in raw or "high" not in raw:
            raise _err(src, key, f"a range needs low and high, got {raw!r}")
        low = _expect(src, f"{key}.low", raw["low"], (int, float), "a number")
        high = _expect(src, f"{key}.high", raw["high"], (int, float), "a number")
        if not low <= high:
            raise _err(src, key, f"`low <= high` must hold, but got (low={low}, high={high})")
        log = bool(raw.get("log", False))
        if log and low <= 0:
            raise _err(src, key, f"a log range needs low > 0, but got low={low}")
        integer = bool(raw.get("int", isinstance(low, int) and isinstance(high, int) and not log and "step" not in raw))
        return Param(name=name, low=float(low), high=float(high), log=log, step=raw.get("step"), integer=integer)
    if isinstance(raw, (int, float, str, bool)):
        return Param(name=name, value=raw)
    raise _err(src, key, f"got {raw!r}; expected a list (choice), a mapping with low/high (range) or a scalar (fixed)")


def _metric(src: str, key: str, raw: Any, classes: tuple[str, ...], extra: set[str]) -> dict[str, Any]:
    entry = {"metric": raw} if isinstance(raw, str) else raw
    if not isinstance(entry, dict):
        raise _err(src, key, f"got {raw!r}; expected a metric name or a mapping with 'metric'")
    unknown = set(entry) - {"metric", "class"} - extra
    if unknown:
        raise _err(src, key, f"unknown field(s) {sorted(unknown)}; accepted: metric, class, {', '.join(sorted(extra))}")
    metric = entry.get("metric")
    if metric not in METRICS:
        raise _err(src, key, f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    needs_class = METRICS[metric].per_device
    cls = entry.get("class")
    if needs_class and cls is None:
        if len(classes) != 1:
            raise _err(src, key, f"metric {metric!r} is measured per device class; add class: one of {', '.join(classes)}")
        cls = classes[0]
    if not needs_class and cls is not None:
        raise _err(src, key, f"metric {metric!r} does not depend on a device class; remove class: {cls!r}")
    if cls is not None and cls not in classes:
        raise _err(src, key, f"unknown device class {cls!r}; the study's classes are {', '.join(classes)} (key 'classes')")
    return {**entry, "metric": metric, "class": cls}


def _check_space(src: str, space: tuple[Param, ...]) -> None:
    """Every method choice is a pipeline that can work; every ``M.setting`` names a method
    offered and a setting it has (checked here, not after the first trial has trained)."""
    from deepfleet.compressors import compressor_class, parse_methods
    from deepfleet.compressors.training import FINETUNE_KEYS, FINETUNE_SECTION

    method = next(p for p in space if p.name == "method")
    offered: set[str] = set()
    for choice in method.choices if method.choices is not None else (method.value,):
        try:
            offered.update(parse_methods(str(choice)))
        except ConfigError as exc:
            raise _err(src, "space.method", f"{choice!r}: {exc}") from None
    for p in space:
        if p.name == "method":
            continue
        name, dot, setting = p.name.partition(".")
        if name == FINETUNE_SECTION and dot:  # the fine-tuning every pipeline ends with
            if setting not in FINETUNE_KEYS:
                raise _err(src, f"space.{p.name}", f"not a fine-tuning setting; accepted: {', '.join(FINETUNE_KEYS)}")
            continue
        if not dot or name not in offered:
            raise _err(src, f"space.{p.name}", f"a setting is METHOD.SETTING for a method in space.method "
                       f"(offered: {', '.join(sorted(offered))}) or finetune.SETTING")
        fields = list(compressor_class(name).config_class.__dataclass_fields__)
        if setting not in fields:
            raise _err(src, f"space.{p.name}", f"{name} has no setting {setting!r}; accepted: {', '.join(fields)}")


def parse_study(raw: Any, source: str = "<dict>") -> StudySpec:
    """Validate a study mapping (as loaded from YAML) into a StudySpec; raise ConfigError."""
    src = source
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: a study file must be a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise _err(src, unknown[0], f"unknown key; accepted keys: {', '.join(sorted(_TOP))}")
    for key in ("name", "model", "data"):
        if key not in raw:
            raise _err(src, key, "missing; every study names its model, data and name")
        _expect(src, key, raw[key], str, "a string")
    classes = tuple(raw.get("classes") or ("local",))
    for c in classes:
        _expect(src, "classes", c, str, "a list of device class names")
    space = tuple(_param(src, str(k), v) for k, v in (raw.get("space") or {}).items())
    method = next((p for p in space if p.name == "method"), None)
    if method is None:
        space = (Param(name="method", value="deepiot"),) + space
    _check_space(src, space)

    objectives = []
    for i, o in enumerate(raw.get("objectives") or ["accuracy", "bytes"]):
        e = _metric(src, f"objectives[{i}]", o, classes, {"direction"})
        direction = e.get("direction", METRICS[e["metric"]].direction)
        if direction not in ("minimize", "maximize"):
            raise _err(src, f"objectives[{i}].direction", f"got {direction!r}; accepted: minimize, maximize")
        objectives.append(Objective(metric=e["metric"], direction=direction, device_class=e["class"]))
    labels = [o.label for o in objectives]
    if len(set(labels)) != len(labels):
        raise _err(src, "objectives", f"an objective appears twice: {labels}")
    constraints = []
    for i, c in enumerate(raw.get("constraints") or []):
        e = _metric(src, f"constraints[{i}]", c, classes, {"max"})
        if "max" not in e:
            raise _err(src, f"constraints[{i}]", "a constraint needs max: the largest acceptable value")
        bound = _expect(src, f"constraints[{i}].max", e["max"], (int, float), "a number")
        constraints.append(Constraint(metric=e["metric"], max=float(bound), device_class=e["class"]))

    trials = _expect(src, "trials", raw.get("trials", 10), int, "a positive integer")
    parallelism = _expect(src, "parallelism", raw.get("parallelism", 2), int, "a positive integer")
    if trials < 1 or parallelism < 1:
        raise _err(src, "trials" if trials < 1 else "parallelism", "must be >= 1")
    res_raw = raw.get("resources") or {}
    bad = set(res_raw) - {"cpu", "gpu"}
    if bad:
        raise _err(src, f"resources.{sorted(bad)[0]}", "unknown; accepted: cpu, gpu")
    resources = Resources(cpu=float(res_raw.get("cpu", 1.0)), gpu=float(res_raw.get("gpu", 0.0)))
    if resources.cpu <= 0 or resources.gpu < 0 or math.isnan(resources.cpu):
        raise _err(src, "resources", f"cpu must be > 0 and gpu >= 0, got {res_raw}")
    sampler = raw.get("sampler", "auto")
    if sampler not in SAMPLERS:
        raise _err(src, "sampler", f"got {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    m_raw = raw.get("measure") or {}
    fields = StudyMeasure.__dataclass_fields__
    bad = set(m_raw) - set(fields)
    if bad:
        raise _err(src, f"measure.{sorted(bad)[0]}", f"unknown; accepted: {', '.join(fields)}")
    judging = _judging(src, raw.get("search") or {})
    backend = m_raw.get("backend", "auto")
    if backend not in BACKEND_CHOICES:
        raise _err(src, "measure.backend", f"got {backend!r}; accepted: {', '.join(BACKEND_CHOICES)} (auto: the "
                   "first of each device's backends in the fleet file that it has installed)")
    _resolve_names(src, raw["model"], raw["data"])
    _check_inputs(src, space, raw["data"])
    base = raw.get("base") or {}
    bad = set(base) - {"checkpoint", "epochs"}
    if bad:
        raise _err(src, f"base.{sorted(bad)[0]}", "unknown; accepted: checkpoint, epochs")
    checkpoint = base.get("checkpoint")
    if checkpoint is not None:
        checkpoint = _relative_to(src, _expect(src, "base.checkpoint", checkpoint, str, "a file path"))
        if not Path(checkpoint).is_file():
            raise _err(src, "base.checkpoint", f"{checkpoint!r} does not exist; give a state_dict saved with "
                       "torch.save(model.state_dict(), path), or remove the key to train the base")
    epochs = _expect(src, "base.epochs", base.get("epochs", 60), int, "a positive integer")
    if epochs < 1:
        raise _err(src, "base.epochs", f"must be >= 1, but got {epochs}")
    return StudySpec(
        name=raw["name"], model=raw["model"], data=raw["data"],
        seed=_expect(src, "seed", raw.get("seed", 0), int, "an integer"),
        base_checkpoint=checkpoint, base_epochs=epochs,
        space=space, objectives=tuple(objectives), constraints=tuple(constraints), trials=trials,
        parallelism=parallelism, resources=resources, fleet=raw.get("fleet"), classes=classes,
        storage=raw.get("storage"), sampler=sampler, measure=StudyMeasure(**m_raw),
        sampler_seed=_expect(src, "sampler_seed", raw["sampler_seed"], int, "an integer") if "sampler_seed" in raw else None,
        training=dict(raw.get("training") or {}), judging=judging, source=src,
    )


def _judging(src: str, raw: Any) -> Judging:
    if not isinstance(raw, dict):
        raise _err(src, "search", f"got {raw!r}; expected a mapping with predictor and audit_rejections")
    bad = set(raw) - {"predictor", "audit_rejections"}
    if bad:
        raise _err(src, f"search.{sorted(bad)[0]}", "unknown; accepted: predictor, audit_rejections")
    predictor = raw.get("predictor", Judging.predictor)
    if predictor not in PREDICTORS:
        raise _err(src, "search.predictor", f"got {predictor!r}; accepted: {', '.join(PREDICTORS)}")
    share = _expect(src, "search.audit_rejections", raw.get("audit_rejections", Judging.audit_rejections),
                    (int, float), "a share in [0, 1]")
    if not 0 <= share <= 1:
        raise _err(src, "search.audit_rejections", f"got {share}; expected a share in [0, 1] (0.1 measures "
                   "one in ten candidates rejected on a prediction)")
    return Judging(predictor=predictor, audit_rejections=float(share))


def _check_inputs(src: str, space: tuple[Param, ...], data: str) -> None:
    """``deepiot.inputs`` values are input modes, and ``sensors`` needs data that names them."""
    from deepfleet.compressors._graph import INPUT_MODES
    from deepfleet.data import sensing_info

    p = next((p for p in space if p.name == "deepiot.inputs"), None)
    if p is None:
        return
    if p.low is not None:
        raise _err(src, "space.deepiot.inputs", f"a range is not a choice of input modes; give a list of {', '.join(INPUT_MODES)}")
    values = p.choices if p.choices is not None else (p.value,)
    bad = [v for v in values if v not in INPUT_MODES]
    if bad:
        raise _err(src, "space.deepiot.inputs", f"got {bad[0]!r}; accepted: {', '.join(INPUT_MODES)}")
    if "sensors" in values:
        try:
            info = sensing_info(data)
        except DeepfleetError as exc:
            raise _err(src, "data", str(exc)) from None
        if info.sensors is None:
            raise _err(src, "space.deepiot.inputs", f"sensors needs the data to name each channel's sensor, but "
                       f"{data!r} names none; add an array 'sensors' (one name per channel) to the .npz, or "
                       "offer features instead")


def _relative_to(src: str, path: str) -> str:
    """``path`` as written in the study file ``src``: relative paths are relative to the file."""
    p = Path(path).expanduser()
    if not p.is_absolute() and src not in ("<dict>", ""):
        p = Path(src).parent / p
    return str(p)


def _resolve_names(src: str, model: str, data: str) -> None:
    """Find the model and the data set now, before Ray starts or the study is created."""
    from deepfleet.data import check_data
    from deepfleet.models import check_model

    for key, check, value in (("model", check_model, model), ("data", check_data, data)):
        try:
            check(value)
        except DeepfleetError as exc:
            raise _err(src, key, str(exc)) from None


def check_fleet(spec: StudySpec, energy: dict[str, dict[str, str | None]]) -> None:
    """Check that every class the study measures on has devices and, for each energy objective
    or constraint, that every device of its class gives that kind of energy.

    ``energy``: {class: {device: the energy kind it gives ('measured', 'simulated') or None
    for no sensor}}, from the fleet. Raises ConfigError naming the devices and what to use.
    """
    for cls in spec.device_classes:
        if cls not in energy or not energy[cls]:
            have = ", ".join(sorted(energy)) or "(none)"
            raise ConfigError(f"{spec.source}: classes: device class {cls!r} has no device in the fleet; "
                              f"classes there: {have}")
    for i, x in enumerate((*spec.objectives, *spec.constraints)):
        kind = METRICS[x.metric].energy_kind
        if kind not in ("measured", "simulated"):
            continue
        devices = energy[str(x.device_class)]
        lacking = sorted(d for d, k in devices.items() if k != kind)
        if lacking:
            key = f"objectives[{i}]" if i < len(spec.objectives) else f"constraints[{i - len(spec.objectives)}]"
            given = ", ".join(f"{d} ({devices[d] or 'no sensor'})" for d in lacking)
            offered = [m for m in ("energy", "energy_simulated", "energy_estimated") if m != x.metric]
            raise ConfigError(f"{spec.source}: {key}: {x.metric} needs {kind} energy on every device of class "
                              f"{x.device_class!r}, but {given} give none; use {' or '.join(offered)}")


def check_sensing(spec: StudySpec, power: dict[str, dict[str, set[str]]]) -> None:
    """For each objective or constraint on sensing energy (``energy_sensing``,
    ``energy_total``): the data must name its sensors and window, and every device of the
    class must give the power of every sensor the data names (any model may keep any of them).

    ``power``: {class: {device: names of the sensors its fleet entry gives a power for}}.
    Raises ConfigError naming the metric's key, the data or the device, and the fix.
    """
    from deepfleet.data import sensing_info

    needing = [(i, x) for i, x in enumerate((*spec.objectives, *spec.constraints)) if METRICS[x.metric].sensing]
    if not needing:
        return
    try:
        info = sensing_info(spec.data)
    except DeepfleetError as exc:
        raise _err(spec.source, "data", str(exc)) from None
    for i, x in needing:
        key = f"objectives[{i}]" if i < len(spec.objectives) else f"constraints[{i - len(spec.objectives)}]"
        if info.sensors is None:
            raise ConfigError(f"{spec.source}: {key}: {x.metric} needs the data to name each channel's sensor, "
                              f"but {spec.data!r} names none; add an array 'sensors' (one name per channel) "
                              "to the .npz, or drop the metric")
        if info.window_s is None:
            raise ConfigError(f"{spec.source}: {key}: {x.metric} needs the length of one sample's signal, but "
                              f"{spec.data!r} gives none; add a scalar 'sample_hz' (sequences) or 'window_s' "
                              "(seconds) to the .npz")
        wanted = list(dict.fromkeys(info.sensors))
        for device, have in sorted(power.get(str(x.device_class), {}).items()):
            lacking = [w for w in wanted if w not in have]
            if lacking:
                raise ConfigError(
                    f"{spec.source}: {key}: {x.metric} needs the power of every sensor of the data "
                    f"({', '.join(wanted)}) on every device of class {x.device_class!r}, but device "
                    f"{device!r} gives none for {', '.join(lacking)}; add sensors: "
                    f"{{{lacking[0]}: {{mw: ...}}}} to its entry (or to defaults:) in the fleet file")


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file {str(p)!r} does not exist; give the path to a study.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_study(raw, str(p))
