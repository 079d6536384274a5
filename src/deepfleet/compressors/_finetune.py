"""Fine-tuning with reparametrised weights, shared by quantisers and sparsity methods.

A :class:`Reparam` computes some of a model's weights from tensors of its own: float shadow
weights behind fixed-point or binary values (straight-through estimator), codebooks behind
shared weights, weights behind a pruning mask. :func:`finetune` trains those tensors (and the
model's other parameters) through ``torch.func.functional_call``, which substitutes the
computed weights for the module's parameters in every layer type, recurrent ones included.
Evaluation and the returned model always use the *final* (deployed) weights.

Also here: the helpers every quantiser needs (the weight tensors to quantise, BatchNorm
folding so that the quantised weights are the ones the device multiplies with).
"""

from __future__ import annotations

import abc
import copy
import dataclasses

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from tqdm.auto import tqdm

from deepfleet.compressors._ops import trace
from deepfleet.compressors.training import (
    BestEpoch,
    TrainConfig,
    adam_cosine,
    device_of,
    distillation_loss,
    epoch_batches,
    training_set,
)
from deepfleet.data import Dataset

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM, nn.GRU)


class Reparam(abc.ABC):
    """Some weights of a model, computed from trainable tensors held here."""

    @abc.abstractmethod
    def trainable(self) -> list[torch.Tensor]:
        """The leaf tensors the optimiser updates (requires_grad=True)."""

    @abc.abstractmethod
    def weights(self, *, final: bool) -> dict[str, torch.Tensor]:
        """Parameter name -> weight. ``final=False``: the training forward (differentiable,
        may be random); ``final=True``: the deployed values (deterministic, no graph)."""

    def after_step(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Called after every optimiser step (clipping, re-rounding, mask updates)."""

    def state(self) -> list[torch.Tensor]:
        """Every tensor whose value defines the final weights (checkpointed with the best epoch)."""
        return self.trainable()


def weight_names(model: nn.Module) -> list[str]:
    """Qualified names of the weight matrices of every Linear, Conv1d/2d, LSTM and GRU
    (biases, norms and other parameters excluded), in module order."""
    names = []
    for mname, mod in model.named_modules():
        if isinstance(mod, _WEIGHTED):
            prefix = f"{mname}." if mname else ""
            names += [prefix + n for n, _ in mod.named_parameters(recurse=False) if n.startswith("weight")]
    return names


def install(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """A traced copy of ``model`` with every BatchNorm that directly follows a Linear/Conv (its
    only user) folded into that layer, as the exporter would fold it; the model is put in eval
    mode for the fold (running statistics are used). Other BatchNorms stay."""
    gm = trace(copy.deepcopy(model).eval())
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer, bn = modules[str(src.target)], modules[str(node.target)]
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            fused: nn.Module = fuse_conv_bn_eval(layer, bn)
        elif isinstance(layer, nn.Linear) and layer.out_features == bn.num_features:
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        parent, _, leaf = str(src.target).rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(str(node.target))
        modules = dict(gm.named_modules())
    gm.graph.lint()
    gm.recompile()
    return gm


def with_overrides(cfg: TrainConfig, epochs: int | None, lr: float | None) -> TrainConfig:
    """``cfg`` with a method's own epochs / learning rate where given."""
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    if lr is not None:
        cfg = dataclasses.replace(cfg, lr=lr)
    return cfg


def finetune(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    reparam: Reparam,
    seed: int = 0,
    teacher: nn.Module | None = None,
    desc: str = "fine-tune",
    progress: bool = False,
) -> tuple[nn.Module, dict[str, list[float]]]:
    """Train ``model`` in place with ``reparam``'s weights; keep the best validation epoch
    (by ``cfg.select``; the untrained start counts as an epoch).

    Adam with cosine decay and early stopping like :func:`deepfleet.compressors.training.train`; the loss
    distils from ``teacher`` when ``cfg.kd_alpha > 0``. On return the model holds the final
    weights of the best epoch (the reparam's tensors are restored to that epoch too). With
    ``cfg.epochs == 0`` it only installs the final weights.
    """
    dev = device_of(model)
    final = reparam.weights(final=True)  # builds every encoding: once
    others = [p for n, p in model.named_parameters() if n not in final]
    history: dict[str, list[float]] = {"loss": [], "val_accuracy": []}
    install(model, final)
    if cfg.epochs == 0:
        return model, history
    ts = training_set(data, cfg, teacher, seed)
    n = len(ts.y)
    opt, sched = adam_cosine([*reparam.trainable(), *others], cfg, n)
    gen = torch.Generator().manual_seed(seed)

    def snapshot() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        return [t.detach().clone() for t in reparam.state()], copy.deepcopy(model.state_dict())

    keeper = BestEpoch(cfg, snapshot)
    keeper.consider(model, data)  # the untrained start is a candidate too
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        model.train()
        total = 0.0
        for xb, yb, tb in epoch_batches(ts, cfg.batch_size, gen, dev):
            out = functional_call(model, reparam.weights(final=False), (xb,))
            loss = distillation_loss(out, yb, tb, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            reparam.after_step()
            total += float(loss.detach()) * len(yb)
        install(model, reparam.weights(final=True))
        val, stop = keeper.consider(model, data)
        history["loss"].append(total / n)
        history["val_accuracy"].append(val)
        bar.set_postfix(loss=f"{total / n:.3f}", val=f"{val:.3f}")
        if stop:
            break
    tensors, state = keeper.best
    with torch.no_grad():
        for t, saved in zip(reparam.state(), tensors):
            t.copy_(saved)
    model.load_state_dict(state)
    install(model, reparam.weights(final=True))
    return model, history
