"""Supervised training, evaluation and distillation for classification models.

Pure torch; knows nothing of masks, Ray or devices. Model selection reads the validation split
only: the test split is for reporting.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deepfleet.data import Dataset


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train: Adam with cosine decay, best-validation checkpoint, early stopping."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation accuracy before stopping
    kd_alpha: float = 0.0  # weight of the distillation term (0 = plain cross-entropy)
    kd_temperature: float = 4.0
    # Function matching (Beyer et al., 2022): distil on mixup-interpolated inputs, the teacher
    # queried on the same mixed inputs. Beta(mixup, mixup) mixing weights; 0 = off.
    mixup: float = 0.0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def logits_of(model: nn.Module, X: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Model outputs for all of ``X`` in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    dev = device_of(model)
    Xt = torch.as_tensor(X)
    out = [model(Xt[i : i + batch_size].to(dev)).float().cpu() for i in range(0, len(Xt), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    """Fraction of samples classified correctly (in [0, 1])."""
    pred = logits_of(model, X).argmax(1).numpy()
    return float((pred == y).mean())


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def distillation_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    cfg: TrainConfig,
    *,
    per_sample: bool = False,
) -> torch.Tensor:
    """(1 - a) CE(logits, y) + a T^2 KL(softmax(teacher/T) || softmax(logits/T)) (Hinton et al.).

    Returns the batch mean, or one value per sample with ``per_sample=True``.
    """
    ce = F.cross_entropy(logits, y, reduction="none")
    if teacher_logits is None or cfg.kd_alpha == 0:
        return ce if per_sample else ce.mean()
    T = cfg.kd_temperature
    kl = F.kl_div(
        F.log_softmax(logits / T, 1), F.log_softmax(teacher_logits / T, 1), log_target=True,
        reduction="none",
    ).sum(1)
    loss = (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * T * T * kl
    return loss if per_sample else loss.mean()


def _function_matching_loss(
    model: nn.Module, teacher: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
    beta: torch.distributions.Beta, cfg: TrainConfig,
) -> torch.Tensor:
    """(1 - a) CE on the clean batch + a T^2 KL(teacher || student) on a mixup of the batch."""
    lam = beta.sample((len(xb),)).to(xb.device).view((-1,) + (1,) * (xb.dim() - 1))
    mixed = lam * xb + (1 - lam) * xb[torch.randperm(len(xb), device=xb.device)]
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(mixed)
    both = model(torch.cat([xb, mixed]))
    ce = F.cross_entropy(both[: len(xb)], yb)
    T = cfg.kd_temperature
    kl = F.kl_div(F.log_softmax(both[len(xb):] / T, 1), F.log_softmax(t_logits / T, 1),
                  log_target=True, reduction="batchmean")
    return (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * T * T * kl


def adam_cosine(params: Any, cfg: TrainConfig, n_samples: int) -> tuple[torch.optim.Optimizer, Any]:
    """Adam with ``cfg``'s learning rate and weight decay, and a cosine decay to zero over the
    ``cfg.epochs`` epochs of ``n_samples`` in batches of ``cfg.batch_size`` (stepped per batch)."""
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(n_samples / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    teacher: nn.Module | None = None,
    desc: str = "train",
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict[str, list[float]]]:
    """Train ``model`` in place on ``data``; return it loaded with its best-validation weights.

    With ``teacher`` and ``cfg.kd_alpha > 0`` the loss adds distillation from the teacher's
    outputs (computed once, the teacher is not trained). History holds per-epoch train loss and
    validation accuracy.
    """
    history: dict[str, list[float]] = {"loss": [], "val_accuracy": []}
    if cfg.epochs <= 0:
        return model, history
    dev = device_of(model)
    gen = torch.Generator().manual_seed(seed)
    X = torch.as_tensor(data.X_train)
    y = torch.as_tensor(data.y_train)
    online = teacher is not None and cfg.kd_alpha > 0 and cfg.mixup > 0
    teacher_logits = logits_of(teacher, X) if teacher is not None and cfg.kd_alpha > 0 and not online else None
    beta = torch.distributions.Beta(cfg.mixup, cfg.mixup) if online else None
    opt, sched = adam_cosine(model.parameters(), cfg, len(y))
    best_acc, best_state, stale = -1.0, copy.deepcopy(model.state_dict()), 0
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        total = 0.0
        for idx in batches(len(y), cfg.batch_size, gen):
            xb, yb = X[idx].to(dev), y[idx].to(dev)
            if beta is not None:
                loss = _function_matching_loss(model, teacher, xb, yb, beta, cfg)  # type: ignore[arg-type]
            else:
                tb = teacher_logits[idx].to(dev) if teacher_logits is not None else None
                loss = distillation_loss(model(xb), yb, tb, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val = accuracy(model, data.X_val, data.y_val)
        history["loss"].append(total / len(y))
        history["val_accuracy"].append(val)
        bar.set_postfix(loss=f"{total / len(y):.3f}", val=f"{val:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, val)
        if val > best_acc:
            best_acc, best_state, stale = val, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return model, history
