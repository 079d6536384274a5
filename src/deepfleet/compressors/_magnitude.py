"""Magnitude pruning (Han et al., 2015): zero the smallest weights, keep the dense shapes.

The pruned tensors stay dense, so a dense runtime gains no speed from the zeros; this is the
contrast that shows structure, not sparsity, is what makes DeepIoT's models fast.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM, nn.GRU)


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight matrix (biases and norms are left alone)."""
    out = []
    for m in model.modules():
        if isinstance(m, PRUNABLE):
            out += [(m, n) for n, _ in m.named_parameters(recurse=False) if n.startswith("weight")]
    return out


def magnitude_masks(model: nn.Module, keep: float) -> dict[tuple[int, str], torch.Tensor]:
    """Global threshold: masks keeping the ``keep`` fraction of weights with largest |w|."""
    weights = prunable_weights(model)
    flat = torch.cat([getattr(m, n).detach().abs().flatten() for m, n in weights])
    k = max(1, int(round(keep * flat.numel())))
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return {(id(m), n): (getattr(m, n).detach().abs() >= threshold) for m, n in weights}


def magnitude_prune(model: nn.Module, keep: float) -> nn.Module:
    """A copy of ``model`` with all but the ``keep`` fraction of weights set to zero."""
    pruned = copy.deepcopy(model)
    masks = magnitude_masks(pruned, keep)
    with torch.no_grad():
        for m, n in prunable_weights(pruned):
            getattr(m, n).mul_(masks[(id(m), n)])
    return pruned
