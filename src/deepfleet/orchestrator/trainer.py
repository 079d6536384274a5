"""Training for a search: Ray tasks that return plain data, never a live model.

``train_candidate(job)`` compresses the study's model with one trial's parameters through
:func:`deepfleet.api.compress_model` and returns the :class:`~deepfleet.candidate.Candidate`
unchanged with its artifact's bytes (built once, in memory: they travel through Ray's object
store to the driver's node whatever node trained them, and the driver writes them once).
``train_base(job)`` trains (or finds) the study's original model once and returns it the same
way, so that trials neither retrain nor re-export it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import ray

from deepfleet.api import BaseSpec
from deepfleet.artifact import ArtifactFiles
from deepfleet.candidate import Candidate


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """What a training task needs (plain data): the study's model, data, seed and base, the
    trial's flat parameters (``method``, ``METHOD.SETTING``), the study's ``training`` section
    and the torch threads to use."""

    model: str
    data: str
    seed: int = 0
    base: BaseSpec = field(default_factory=BaseSpec)
    params: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    threads: int = 1


@dataclass(frozen=True)
class Trained:
    """A task's answer: the candidate and its artifact (``cached``: the original came from the
    cache or a checkpoint rather than being trained now)."""

    candidate: Candidate
    artifact: ArtifactFiles
    cached: bool = False


def compress_settings(params: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`deepfleet.api.compress_model` for a trial's flat parameters.

    ``method`` is the pipeline; every ``M.setting`` configures method M when M is in it (a
    method's settings are conditional on it being chosen), e.g. ``deepiot.target``,
    ``fixedpoint.bits``, ``fixedpoint.rounding``; ``finetune.SETTING`` (e.g. ``finetune.kd_alpha``)
    sets the fine-tuning every pipeline ends with, and ``training.finetune_epochs`` shortens it (a
    search affords less). Unknown settings fail when the pipeline is built.
    """
    from deepfleet.api import FINETUNE
    from deepfleet.compressors import parse_methods
    from deepfleet.compressors.training import FINETUNE_SECTION
    from deepfleet.search import apply_params

    methods = parse_methods(str(params.get("method", "deepiot")))
    per_method = apply_params(params)
    finetune = FINETUNE
    if "finetune_epochs" in training:
        finetune = dataclasses.replace(FINETUNE, epochs=int(training["finetune_epochs"]))
    settings = {m: dict(per_method.get(m, {})) for m in methods}
    if FINETUNE_SECTION in per_method:
        settings[FINETUNE_SECTION] = dict(per_method[FINETUNE_SECTION])
    return {"method": methods, "settings": settings, "finetune": finetune}


def _node() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def train_candidate(job: TrainJob) -> Trained:
    """Compress for one trial. Raises the API's DeepfleetError subclasses unchanged (Ray
    re-raises them in the driver)."""
    import torch

    from deepfleet.api import compress_model

    torch.set_num_threads(job.threads)
    c = compress_model(job.model, data=job.data, seed=job.seed, base=job.base, progress=False,
                       with_original=False, **compress_settings(job.params, job.training))
    node = _node()
    cand = dataclasses.replace(c.candidate, node=node) if node else c.candidate
    return Trained(cand, c.artifact, bool(c.details["base_cached"]))


def train_base(job: TrainJob) -> Trained:
    """Train (or find cached, or load ``job.base.checkpoint``) the study's original model once,
    before any trial needs it: trials then hit the cache instead of all training the same base
    at once."""
    from deepfleet.api import original_model

    cand, files, cached = original_model(job.model, data=job.data, seed=job.seed, base=job.base,
                                         threads=job.threads)
    return Trained(cand, files, cached)
