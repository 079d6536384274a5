"""Running compressors one after the other: a pipeline such as DeepIoT, then fixed point."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deepfleet.compressors._encoding import Encoding, kept_values
from deepfleet.compressors._registry import check_pipeline
from deepfleet.compressors.base import BaseCompressor, Context
from deepfleet.data import Dataset


@dataclass(frozen=True, kw_only=True)
class PipelineResult:
    """The final model, the encodings of its quantised weights, the parameters pruned by a
    sparsity method (``sparse``: the exporter stores their nonzeros), and one record per step
    (``method``, ``stage``, ``info``, ``seconds``, and the ``params`` and ``nonzero``
    parameters of the model it returned; plain data). ``nonzero`` counts what the step's
    encodings store where they store fewer values than the weights have (SparseSep's atoms
    and nonzero codes), else the nonzero weights."""

    model: nn.Module
    encodings: dict[str, Encoding] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    sparse: frozenset[str] = frozenset()

    @property
    def methods(self) -> list[str]:
        return [s["method"] for s in self.steps]

    def kept_params(self, params_before: int) -> float:
        """Parameters kept by pruning, as a fraction of ``params_before``: the nonzero parameters
        before quantisation (a weight a quantiser rounds to zero is stored, not pruned), or what
        a factorising step (SparseSep) stores. Calibration keeps them all."""
        pruned = [s for s in self.steps if s["stage"] not in ("quantise", "calibrate") or s.get("factored")]
        if not pruned:
            return self.steps[-1]["params"] / params_before if self.steps else 1.0
        return pruned[-1]["nonzero"] / params_before


def stored_params(model: nn.Module, encodings: dict[str, Encoding]) -> int:
    """Parameters ``model`` keeps: per parameter, what its encoding stores when that is fewer
    values than the tensor has (:attr:`Encoding.stored`), else its nonzero values."""
    return sum(kept_values(name, p, encodings) for name, p in model.named_parameters())


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
    sparse: frozenset[str] = frozenset()
    for comp in compressors:
        t0 = time.perf_counter()
        out = comp.compress(current, data, ctx)
        # A calibration changes no weight: the encodings before it still hold.
        encodings = {**encodings, **out.encodings} if comp.stage == "calibrate" else out.encodings
        current, sparse = out.model, sparse | out.sparse
        steps.append({"method": comp.name, "stage": comp.stage, "info": out.info,
                      "seconds": round(time.perf_counter() - t0, 2),
                      "params": sum(p.numel() for p in current.parameters()),
                      "nonzero": stored_params(current, encodings),
                      "factored": any(e.stored is not None for e in out.encodings.values())})
    names = {n for n, _ in current.named_parameters()}
    return PipelineResult(model=current.eval(), encodings=encodings, steps=steps, sparse=sparse & names)
