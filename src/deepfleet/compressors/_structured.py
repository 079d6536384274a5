"""The structured pruning methods as compressors: DeepIoT and uniform L1-norm pruning.

Both choose hidden units to keep, extract the smaller dense model (:mod:`._extract`) and
fine-tune it; they differ only in how the units are chosen (:mod:`._deepiot`, :mod:`._l1`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepfleet.compressors._checks import check_choice, check_fraction
from deepfleet.compressors._cost import cost_model, kept_fraction
from deepfleet.compressors._deepiot import DeepIoTConfig
from deepfleet.compressors._extract import extract
from deepfleet.compressors._graph import analyse
from deepfleet.compressors._l1 import uniform_l1_keep
from deepfleet.compressors._pipeline import deepiot_compress, layer_table
from deepfleet.compressors.base import BaseCompressor, Compressed, Context, Options
from deepfleet.compressors.training import device_of, train
from deepfleet.data import Dataset


class DeepIoT(BaseCompressor):
    """DeepIoT's compressor-critic: search, extract, verify, fine-tune (:func:`deepiot_compress`)."""

    name = "deepiot"
    stage = "structure"
    config_class = DeepIoTConfig

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        quick = {"iterations": 40, "eval_every": 20} if options.quick else {}
        return {"target": options.target, "metric": options.metric, **quick}

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: DeepIoTConfig = self.config
        res = deepiot_compress(model, data, cfg, ctx.finetune, seed=ctx.seed, progress=ctx.progress,
                               teacher=ctx.teacher)
        info = {
            "settings": dataclasses.asdict(cfg),
            "layers": layer_table(res.structure, model, res.model),
            "kept_params": res.kept_params,
            "kept_macs": res.kept_macs,
            "extraction_error": res.extraction_error,
            "search_iterations": res.search.iterations,
            "val_accuracy_search": res.val_accuracy_search,
            "tau": res.search.tau,
            "inputs": res.inputs,
        }
        return Compressed(model=res.model.eval(), info=info)


@dataclass(frozen=True, kw_only=True)
class L1Config:
    target: float = 0.05  # kept fraction of ``metric``
    metric: str = "params"  # params | macs

    def __post_init__(self) -> None:
        check_fraction("l1", "target", self.target)
        check_choice("l1", "metric", self.metric, choices=("params", "macs"))


class L1(BaseCompressor):
    """Structured L1-norm pruning (Li et al., 2017): the same kept ratio in every layer."""

    name = "l1"
    stage = "structure"
    config_class = L1Config

    @classmethod
    def settings_from(cls, options: Options, given: Mapping[str, Any]) -> dict[str, Any]:
        return {"target": options.target, "metric": options.metric}

    def compress(self, model: nn.Module, data: Dataset, ctx: Context) -> Compressed:
        cfg: L1Config = self.config
        dev = device_of(model)
        st = analyse(model, torch.as_tensor(data.X_train[:2]).to(dev))
        cm = cost_model(st)
        keep, ratio = uniform_l1_keep(st, st.graph_module, cm, cfg.target, cfg.metric)
        small: nn.Module = extract(st, st.graph_module, keep)
        small, _ = train(small, data, ctx.finetune, seed=ctx.seed, teacher=ctx.teacher, desc="l1",
                         progress=ctx.progress)
        keep64 = [torch.as_tensor(k, dtype=torch.float64) for k in keep]
        info = {
            "settings": dataclasses.asdict(cfg),
            "layers": layer_table(st, model, small),
            "ratio": ratio,
            "kept_params": float(kept_fraction(cm, keep64, "params")),
            "kept_macs": float(kept_fraction(cm, keep64, "macs")),
        }
        return Compressed(model=small.eval(), info=info)
