"""The one interface every compressor implements, so that the search can choose among them.

A compressor is built from a frozen, keyword-only config dataclass (its settings), takes a
trained torch model, the data and a :class:`Context`, and returns a :class:`Compressed`: the
compressed torch model, plain-data info, and for quantisers the weight :class:`Encoding` the
exporter must use. Compressors chain into pipelines (:func:`deepfleet.compressors.run_pipeline`)
in the order their :attr:`BaseCompressor.stage` allows: structural methods first (they change
shapes and retrain float weights), then sparsity (zeros that later steps must keep), then at
most one quantiser (its codes are final: nothing after it can change float weights; SparseSep's
dictionaries and sparse codes are final codes too), then at most one calibration (it changes no
weight: temperature scaling adds one op after the logits).

This module may not import Ray, Optuna or anything that talks to devices.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from deepfleet.compressors._encoding import Encoding
from deepfleet.compressors.training import TrainConfig
from deepfleet.data import Dataset

__all__ = ["STAGES", "BaseCompressor", "Compressed", "Context", "Options"]

# Pipeline order: a method's stage may not be lower than the stage of any method before it.
STAGES = ("structure", "sparsity", "quantise", "calibrate")


@dataclass(frozen=True, kw_only=True)
class Context:
    """What a compressor gets besides the model and the data.

    ``teacher`` is the original (uncompressed) model, for distillation during fine-tuning;
    ``finetune`` the default fine-tuning schedule (a method's own ``epochs``/``lr`` settings
    override it); ``progress`` shows progress bars.
    """

    seed: int = 0
    teacher: nn.Module | None = None
    finetune: TrainConfig = field(default_factory=TrainConfig)
    progress: bool = False


@dataclass(frozen=True, kw_only=True)
class Options:
    """The command's options that several methods share (``deepfleet compress --target-params
    --bits --rounding --quick``); each method takes what applies to it in
    :meth:`BaseCompressor.settings_from`. ``bits``/``rounding`` are None when not given."""

    target: float
    metric: str  # params | macs: what ``target`` is a kept fraction of
    bits: int | None = None
    rounding: str | None = None
    quick: bool = False  # short schedules: a smoke run, not a result


@dataclass(frozen=True, kw_only=True)
class Compressed:
    """What a compressor returns.

    ``model`` runs in torch with exactly the weights the device will use (quantised weights
    hold their decoded values); ``info`` is plain JSON data (``layers``: per-layer details,
    ``settings``, method-specific figures); ``encodings`` maps parameter names of ``model``
    to the encoding the exporter must store them in (empty for float weights); ``sparse``
    names the parameters a sparsity method pruned (the exporter stores their nonzeros).
    """

    model: nn.Module
    info: dict[str, Any]
    encodings: dict[str, Encoding] = field(default_factory=dict)
    sparse: frozenset[str] = frozenset()


class BaseCompressor(abc.ABC):
    """A compression method. Subclasses set the class attributes and implement ``compress``.

    ``name``: registry name; ``stage``: one of :data:`STAGES`; ``config_class``: its frozen
    settings dataclass (validated on construction, raising ConfigError); ``keeps_zeros``:
    whether exact zeros of the input weights stay zero (needed after sparsity methods).
    """

    name: ClassVar[str]
    stage: ClassVar[str]
    config_class: ClassVar[type]
    keeps_zeros: ClassVar[bool] = False
    label: ClassVar[str] = "a quantiser"  # what a final-codes method is, in error messages

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"{self.name} takes a {self.config_class.__name__}, got {type(self.config).__name__}")

    @abc.abstractmethod
    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        """Compress the trained ``model`` (left untouched) on ``data``.

        Decisions (early stopping, thresholds) read the validation split only, never the test
        split. Raises UnsupportedLayerError for a model the method cannot handle.
        """

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        """This method's settings implied by the shared ``options``; the settings the user
        ``given`` for it explicitly win afterwards. Default: it takes none of them. Raises
        ConfigError for an option value the method cannot take."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
