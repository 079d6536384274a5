"""Running compressors one after the other: a pipeline such as DeepIoT, then fixed point."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deepfleet.compressors._encoding import Encoding
from deepfleet.compressors._registry import check_pipeline
from deepfleet.compressors.base import BaseCompressor, Context
from deepfleet.data import Dataset


@dataclass(frozen=True, kw_only=True)
class PipelineResult:
    """The final model, the encodings of its quantised weights, and one record per step
    (``method``, ``stage``, ``info``, ``seconds``, and the ``params`` and ``nonzero``
    parameters of the model it returned; plain data)."""

    model: nn.Module
    encodings: dict[str, Encoding] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return [s["method"] for s in self.steps]

    def kept_params(self, params_before: int) -> float:
        """Parameters kept by pruning, as a fraction of ``params_before``: the nonzero parameters
        before quantisation (a weight a quantiser rounds to zero is stored, not pruned)."""
        pruned = [s for s in self.steps if s["stage"] != "quantise"]
        if not pruned:
            return self.steps[-1]["params"] / params_before if self.steps else 1.0
        return pruned[-1]["nonzero"] / params_before


def run_pipeline(
    model: nn.Module, data: Dataset, compressors: Sequence[BaseCompressor], *, ctx: Context
) -> PipelineResult:
    """Apply ``compressors`` in order to the trained ``model`` (left untouched).

    The order is checked first (ConfigError, before any work). Every step distils from
    ``ctx.teacher``, which defaults to ``model`` itself (the original, not the previous step).
    """
    check_pipeline([c.name for c in compressors])
    if ctx.teacher is None:
        ctx = dataclasses.replace(ctx, teacher=model)
    current, encodings, steps = model, {}, []
    for comp in compressors:
        t0 = time.perf_counter()
        out = comp.compress(current, data, ctx)
        current, encodings = out.model, out.encodings
        steps.append({"method": comp.name, "stage": comp.stage, "info": out.info,
                      "seconds": round(time.perf_counter() - t0, 2),
                      "params": sum(p.numel() for p in current.parameters()),
                      "nonzero": sum(int((p != 0).sum()) for p in current.parameters())})
    return PipelineResult(model=current.eval(), encodings=encodings, steps=steps)
