"""Calibrated confidence: temperature scaling (a final op) and RDeepSense's fine-tuning.

* ``temperature`` (stage ``calibrate``, last in a pipeline, after any quantiser: it changes no
  weight): fits T on the validation split by minimising the NLL of softmax(logits / T)
  (:func:`deepfleet.calibration.fit_temperature`), or takes the given ``temperature``, and
  appends :class:`TemperatureScale` after the model's logits. The exporter writes it as the
  artifact's ``temperature`` op (runtime, ONNX ``Div``): the class ranking, hence accuracy, is
  unchanged; the softmax confidence is calibrated.
* ``rdeepsense`` (stage ``structure``: it retrains float weights, so before sparsity and
  quantisers) fine-tunes as RDeepSense (Yao et al., IMWUT 2018) trains: dropout on the inputs of
  every Linear layer but the model's first (dropout as a Bayesian approximation) and the loss
  ``(1 - mse_weight) NLL + mse_weight MSE`` (MSE between the softmax and the one-hot label, the
  Brier score: a weighted sum of two proper scoring rules is proper). Deployment: the artifact
  holds the deterministic network, i.e. every dropout replaced by its expectation (PyTorch's
  inverted dropout makes that the identity), which is RDeepSense's own single-pass inference;
  MC dropout's average over ``samples`` random masks is computed on the validation split and
  reported beside it (``info["mc"]``) but not deployed: it needs ``samples`` runs per inference
  (latency and energy x ``samples`` on the device) and random numbers the artifact format does
  not have, and the single pass can be calibrated after it with ``temperature``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from deepfleet.calibration import T_MAX, T_MIN, calibration, fit_temperature
from deepfleet.compressors._checks import check_fraction, check_positive
from deepfleet.compressors._finetune import with_overrides
from deepfleet.compressors._ops import LEAF_MODULES, OpInfo, trace
from deepfleet.compressors.base import BaseCompressor, Compressed, Context
from deepfleet.compressors.training import logits_of, train
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError, UnsupportedLayerError


class TemperatureScale(nn.Module):
    """``x / value``: the logits divided by a temperature (a float32 buffer, not a parameter)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(float(value), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.value


LEAF_MODULES[TemperatureScale] = OpInfo("temperature", "value")


def with_temperature(model: nn.Module, value: float) -> fx.GraphModule:
    """A traced copy of ``model`` whose one output goes through :class:`TemperatureScale`;
    the parameters keep their names (so a quantiser's encodings still apply)."""
    gm = trace(copy.deepcopy(model))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    logits = out.args[0]
    if not isinstance(logits, fx.Node):
        raise UnsupportedLayerError("temperature scaling needs a model with one output (the logits), "
                                    f"but it returns {type(logits).__name__}")
    gm.add_submodule("temperature", TemperatureScale(value))
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_module("temperature", (logits,))
    out.args = (scaled,)
    gm.graph.lint()
    gm.recompile()
    return gm


@dataclass(frozen=True, kw_only=True)
class TemperatureConfig:
    temperature: float | None = None  # None: fitted on the validation split; else this T

    def __post_init__(self) -> None:
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not T_MIN <= t <= T_MAX):
            raise ConfigError(f"temperature: temperature must be a number in [{T_MIN}, {T_MAX}] (or null to fit "
                              f"it on the validation split), but got {t!r}")


class Temperature(BaseCompressor):
    """Post-hoc temperature scaling, fitted on the validation split (Guo et al., 2017)."""

    name = "temperature"
    stage = "calibrate"
    config_class = TemperatureConfig
    keeps_zeros = True

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        logits = logits_of(model, data.X_val).numpy()
        before = calibration(logits, data.y_val)
        fitted = self.config.temperature is None
        t = float(np.float32(fit_temperature(logits, data.y_val) if fitted else self.config.temperature))
        scaled = with_temperature(model, t)
        after = calibration(logits_of(scaled, data.X_val).numpy(), data.y_val)
        info = {"settings": dataclasses.asdict(self.config), "layers": [], "temperature": t, "fitted": fitted,
                "val_before": before, "val_after": after}
        return Compressed(model=scaled.eval(), info=info)


@dataclass(frozen=True, kw_only=True)
class RDeepSenseConfig:
    dropout: float = 0.1  # dropout rate on the inputs of every Linear but the first layer
    mse_weight: float = 0.5  # loss = (1 - w) NLL + w MSE(softmax, one-hot)
    samples: int = 20  # MC dropout passes for the reported (not deployed) MC average
    epochs: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"rdeepsense: dropout must be a rate in [0, 1), but got {self.dropout!r}")
        check_fraction("rdeepsense", "mse_weight", self.mse_weight, closed_low=True)
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or not 1 <= self.samples <= 1000:
            raise ConfigError(f"rdeepsense: samples must be a whole number in 1..1000, but got {self.samples!r}")
        check_positive("rdeepsense", "epochs", self.epochs, allow_zero=True)
        check_positive("rdeepsense", "lr", self.lr)


def _dropout_layers(model: nn.Module) -> list[nn.Linear]:
    """Every Linear but the model's first weighted layer (which reads the raw input)."""
    weighted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM, nn.GRU))]
    return [m for m in weighted[1:] if isinstance(m, nn.Linear)]


class _Dropout:
    """Forward pre-hooks that drop a Linear's inputs: while training, or always (MC dropout)."""

    def __init__(self, model: nn.Module, rate: float) -> None:
        self.rate, self.always = rate, False
        self.handles = [m.register_forward_pre_hook(self._hook) for m in _dropout_layers(model)]

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (F.dropout(args[0], self.rate, training=module.training or self.always), *args[1:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def rdeepsense_loss(mse_weight: float) -> Any:
    """(1 - w) NLL + w MSE(softmax, one-hot), batch means (RDeepSense's tunable scoring rule)."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(logits, y)
        mse = ((F.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) ** 2).sum(1).mean()
        return (1 - mse_weight) * nll + mse_weight * mse
    return loss


def mc_logits(model: nn.Module, X: np.ndarray, rate: float, samples: int, *, seed: int = 0) -> np.ndarray:
    """Log of MC dropout's predictive distribution: the mean over ``samples`` passes (dropout
    on, as in training) of the softmax, on ``X``."""
    hooks = _Dropout(model, rate)
    hooks.always = True
    torch.manual_seed(seed)
    try:
        probs = np.mean([torch.softmax(logits_of(model, X), 1).numpy() for _ in range(samples)], 0)
    finally:
        hooks.remove()
    return np.log(np.clip(probs, 1e-12, None))


class RDeepSense(BaseCompressor):
    """RDeepSense's uncertainty-aware fine-tuning: dropout and a weighted NLL + MSE loss."""

    name = "rdeepsense"
    stage = "structure"
    config_class = RDeepSenseConfig

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: RDeepSenseConfig = self.config
        net = copy.deepcopy(model)
        before = calibration(logits_of(net, data.X_val).numpy(), data.y_val)
        hooks = _Dropout(net, cfg.dropout)
        try:
            net, hist = train(net, data, with_overrides(ctx.finetune, cfg.epochs, cfg.lr), seed=ctx.seed,
                              desc="rdeepsense", progress=ctx.progress, loss_fn=rdeepsense_loss(cfg.mse_weight))
        finally:
            hooks.remove()
        net.eval()
        logits = logits_of(net, data.X_val).numpy()
        mc = mc_logits(net, data.X_val, cfg.dropout, cfg.samples, seed=ctx.seed)
        info = {"settings": dataclasses.asdict(cfg), "layers": [], "epochs_trained": len(hist["val_accuracy"]),
                "dropout_layers": len(_dropout_layers(net)), "val_before": before,
                "val_after": {**calibration(logits, data.y_val),
                              "accuracy": float((logits.argmax(1) == data.y_val).mean())},
                "mc": {"samples": cfg.samples, **calibration(mc, data.y_val),
                       "accuracy": float((mc.argmax(1) == data.y_val).mean())}}
        return Compressed(model=net, info=info)
