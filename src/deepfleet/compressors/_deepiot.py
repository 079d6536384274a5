"""DeepIoT's compressor-critic (Yao et al., SenSys 2017), with a target it reaches by itself.

The **compressor** is a small LSTM that steps through the prunable groups in order; step l reads a
fixed-size embedding ``a_l . W_l . B_l`` of group l's (detached) weight matrix and a per-group head
gives keep probabilities ``p_l``. The **critic** is the masked network itself: per-sample masks
``z ~ Bernoulli(p_hat)`` are drawn, the weights train by backprop through the masked network,
and the compressor trains by REINFORCE on the per-sample loss with moving-average baselines.
**Soft deletion**: ``p_hat = gamma * p`` where ``p < tau``.

Two schedules:

* ``paper``: tau rises by ``tau_step`` every ``tau_every`` iterations up to ``tau_max``;
  compression comes only from the race between tau and gamma, as in the original.
* ``target`` (default): the compressor's loss adds ``lambda * E[cost(z)] / cost(all)``, the
  expected kept fraction of parameters (or MACs) under the independent masks, differentiated
  exactly (pathwise, no sampling noise). ``lambda`` follows dual ascent so that the expected
  fraction tracks a geometric path from 1 to the target over ``anneal`` of the iterations, and
  tau is set each step to the threshold whose deterministic mask meets that path, so soft
  deletion hits exactly the units over budget. No schedule to hand-tune.

Either way the final mask keeps the most probable units until the target is met (at least one
unit per group); extraction and fine-tuning follow in :mod:`deepfleet.compressors._pipeline`.

**Inputs** (``inputs``: ``features`` or ``sensors``): the input is one more group, the
compressor's first step; its embedding reads the weights of the layers that read the input, one
column per input unit (the mean of the unit's columns), so an input is judged by what the first
layers make of it, as a hidden unit by its incoming weights. Its units are masked per sample
like any other; a dropped input's weights leave the cost, and a layer that loses every input
leaves with all it feeds alone (:func:`~deepfleet.compressors._cost.effective_keep`). The
target keeps its meaning: a fraction of the original's parameters or MACs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from deepfleet.compressors._cost import CostModel, kept_fraction
from deepfleet.compressors._graph import INPUT_MODES, Structure
from deepfleet.compressors._masked import MaskState, rnn_of, rnn_weights
from deepfleet.compressors.training import TrainConfig, accuracy, device_of, distillation_loss
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError

_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class DeepIoTConfig:
    """Settings of the compressor-critic search (defaults work without tuning)."""

    target: float = 0.05  # kept fraction of ``metric`` to reach, in (0, 1]
    metric: str = "params"  # params | macs
    schedule: str = "target"  # target | paper
    iterations: int = 3000
    batch_size: int = 64
    lr_weights: float = 1e-3
    lr_compressor: float = 2e-3
    hidden: int = 64  # compressor LSTM width (the paper's)
    embed: int = 64
    p_init: float = 0.5  # initial keep probability (sigmoid(0), as in the original)
    gamma: float = 0.5  # soft-deletion factor
    baseline_decay: float = 0.9
    # paper schedule
    tau0: float = 0.5
    tau_step: float = 0.025
    tau_every: int = 500
    tau_max: float = 0.825
    # target schedule
    anneal: float = 0.6  # fraction of the iterations spent descending to the target
    # Dual ascent on log(lambda). On lenet5/digits at 1 % (3 seeds), rate 0.05 from 1.0 swung
    # lambda over 4 orders of magnitude and cost -0.27 pp; rate 0.01 from 10 cost 0.00 pp.
    lambda_init: float = 10.0
    lambda_rate: float = 0.01
    eval_every: int = 250
    distill: float = 0.7  # weight of distillation from the original in the critic's loss
    distill_temperature: float = 4.0
    inputs: str = "none"  # none | features | sensors: mask the input too (see the module docstring)
    # A budget that scales with the model and the data's shape: at most ``work`` forward
    # multiply-accumulates over the search's samples (iterations x batch x the model's MACs per
    # sample), so fewer iterations (at least MIN_ITERATIONS) than ``iterations`` when one costs
    # more. LeNet5 on 28x28 (2.3M MACs) keeps its 3000, LeNet-300-100 too; DeepSense gets ~1500
    # on 64-step windows (4.6M) and ~970 on 100-step windows (7.3M). None: ``iterations`` alone.
    work: float | None = 4.5e11

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ConfigError(
                f"target must be a kept fraction in (0, 1], but got {self.target}; "
                "e.g. 0.05 keeps 5 % of the parameters"
            )
        if self.metric not in ("params", "macs"):
            raise ConfigError(f"metric must be 'params' or 'macs', but got {self.metric!r}")
        if self.schedule not in ("target", "paper"):
            raise ConfigError(f"schedule must be 'target' or 'paper', but got {self.schedule!r}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, but got {self.iterations}")
        if self.work is not None and not self.work > 0:
            raise ConfigError(f"work must be a positive number of multiply-accumulates (or None), but got {self.work}")
        if self.inputs not in INPUT_MODES:
            raise ConfigError(
                f"deepiot.inputs must be one of {', '.join(INPUT_MODES)}, but got {self.inputs!r}; "
                "features masks each input feature (a channel of a sequence or image), sensors "
                "each sensor the data names"
            )


MIN_ITERATIONS = 300


def search_iterations(cfg: DeepIoTConfig, macs: float) -> int:
    """The iterations the search runs for a model of ``macs`` per sample (see ``work``)."""
    if cfg.work is None:
        return cfg.iterations
    fit = int(cfg.work // (cfg.batch_size * max(float(macs), 1.0)))
    return min(cfg.iterations, max(min(MIN_ITERATIONS, cfg.iterations), fit))


@dataclass
class SearchResult:
    """What the search learned: final keep probabilities, threshold and the chosen mask."""

    probabilities: list[np.ndarray]
    tau: float
    keep: list[np.ndarray]
    kept_fraction: float  # of the configured metric, for the chosen mask
    iterations: int
    history: dict[str, list[float]] = field(default_factory=dict)


class Compressor(nn.Module):
    """The compressor LSTM: weight embeddings in, per-group keep probabilities out."""

    def __init__(self, rows: list[int], sizes: list[int], hidden: int, embed: int, p_init: float):
        super().__init__()
        self.a = nn.ParameterList(nn.Parameter(torch.randn(r) / math.sqrt(r)) for r in rows)
        self.B = nn.ParameterList(nn.Parameter(torch.randn(n, embed) / math.sqrt(n)) for n in sizes)
        self.cell = nn.LSTMCell(embed, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.constant_(head.bias, math.log(p_init / (1 - p_init)))

    def forward(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """weights[l]: (rows_l, size_l), detached -> keep probabilities, one (size_l,) per group."""
        h = weights[0].new_zeros(1, self.cell.hidden_size)
        c = torch.zeros_like(h)
        probs = []
        for a, B, head, W in zip(self.a, self.B, self.heads, weights):
            e = (a @ W) @ B  # (embed,): the "global view" of this layer's weights
            h, c = self.cell(e[None], (h, c))
            probs.append(torch.sigmoid(head(h))[0])
        return probs


def group_matrices(structure: Structure, masked: fx.GraphModule) -> list[torch.Tensor]:
    """Each group's weight matrix, rows = fan-in incl. bias row(s), columns = its units (detached).

    For an RNN layer a unit's column gathers its rows in every gate block of W_ih, W_hh and the
    biases, for both directions. Matrices are scaled to unit RMS so embeddings start comparable.
    """
    mats = []
    for g in structure.groups:
        if g.kind == "input":
            M = _input_matrix(structure, masked)
        elif g.kind in ("lstm", "gru"):
            rnn = rnn_of(masked, g.module)
            H, G = rnn.hidden_size, (4 if g.kind == "lstm" else 3)
            cols = []
            for d in range(2 if rnn.bidirectional else 1):
                for w in rnn_weights(rnn, g.layer, d):
                    w = w.detach()
                    w2 = w.reshape(G, H, -1) if w.dim() == 2 else w.reshape(G, H, 1)
                    cols.append(w2.permute(0, 2, 1).reshape(-1, H))  # (G*fan, H)
            M = torch.cat(cols, 0)
        else:
            mod = masked.get_submodule(g.module)
            w = mod.weight.detach().reshape(g.size, -1)  # (units, fan-in)
            b = mod.bias.detach()[:, None] if mod.bias is not None else w.new_zeros(g.size, 1)
            M = torch.cat([w, b], 1).T  # (fan-in + 1, units)
        mats.append(M / M.pow(2).mean().sqrt().clamp_min(1e-8))
    return mats


def _input_matrix(structure: Structure, masked: fx.GraphModule) -> torch.Tensor:
    """The input group's matrix: for every layer that reads the input, its weights as
    (outputs x kernel, input columns), each unit's column the mean of the columns it feeds;
    stacked over those layers (rows = their outputs, columns = input units)."""
    n_in = structure.groups[0].size
    blocks = []
    for lay in structure.layers:
        ids = lay.in_ids
        if not ((ids >= 1) & (ids <= n_in)).any():
            continue
        if lay.kind in ("lstm", "gru"):
            rnn = rnn_of(masked, lay.module)
            w = torch.cat([rnn_weights(rnn, 0, d)[0].detach() for d in range(lay.directions)], 0)
        else:
            w = masked.get_submodule(lay.module).weight.detach()
            w = w.reshape(w.shape[0], w.shape[1], -1).permute(0, 2, 1).reshape(-1, w.shape[1])
        onehot = torch.zeros(len(ids), n_in, dtype=w.dtype, device=w.device)
        onehot[torch.arange(len(ids)), torch.as_tensor(ids - 1)] = 1.0
        blocks.append(w @ (onehot / onehot.sum(0).clamp_min(1)))  # (rows, n_in)
    return torch.cat(blocks, 0)


def choose_mask(
    cm: CostModel, probs: list[np.ndarray], target: float, metric: str
) -> tuple[list[np.ndarray], float, float]:
    """Keep the most probable units (ties broken by group order) until ``metric`` <= target.

    Returns (keep masks, the threshold tau they correspond to, the kept fraction). Every group
    keeps at least its most probable unit, so the result may exceed a tiny target.
    """
    keep = [np.zeros(len(p), bool) for p in probs]
    for k, p in zip(keep, probs):
        k[int(np.argmax(p))] = True
    order = sorted(
        ((float(p[i]), gi, i) for gi, p in enumerate(probs) for i in range(len(p))), reverse=True
    )

    def frac(ks: list[np.ndarray]) -> float:
        return float(kept_fraction(cm, [torch.as_tensor(k, dtype=torch.float64) for k in ks], metric))

    # Bisection over how many of the ordered units to keep: the cost is monotone in that count.
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = [k.copy() for k in keep]
        for _, gi, i in order[:mid]:
            trial[gi][i] = True
        if frac(trial) <= target + 1e-12:
            lo = mid
        else:
            hi = mid - 1
    for _, gi, i in order[:lo]:
        keep[gi][i] = True
    tau = order[lo - 1][0] if lo > 0 else 1.0
    return keep, tau, frac(keep)


def _threshold_for(cm: CostModel, probs: list[torch.Tensor], budget: float, metric: str) -> float:
    """The tau whose deterministic mask 1[p >= tau] has kept fraction closest to ``budget``."""
    p_np = [p.detach().cpu().numpy() for p in probs]
    _, tau, _ = choose_mask(cm, p_np, budget, metric)
    return tau


def search(
    structure: Structure,
    masked: fx.GraphModule,
    state: MaskState,
    cm: CostModel,
    data: Dataset,
    cfg: DeepIoTConfig,
    *,
    seed: int = 0,
    teacher_logits: torch.Tensor | None = None,
    progress: bool = True,
) -> SearchResult:
    """Run the compressor-critic on ``masked`` (its weights train in place); choose the mask.

    ``teacher_logits`` (the original model's outputs on the training split) enable distillation
    in the critic's loss when ``cfg.distill > 0``.
    """
    cfg = dataclasses.replace(cfg, iterations=search_iterations(cfg, cm.full[1]))
    dev = device_of(masked)
    kd = TrainConfig(kd_alpha=cfg.distill, kd_temperature=cfg.distill_temperature)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mats = group_matrices(structure, masked)
    comp = Compressor([m.shape[0] for m in mats], [g.size for g in structure.groups],
                      cfg.hidden, cfg.embed, cfg.p_init).to(dev)
    opt_w = torch.optim.Adam(masked.parameters(), lr=cfg.lr_weights)
    opt_c = torch.optim.Adam(comp.parameters(), lr=cfg.lr_compressor)
    X, y = torch.as_tensor(data.X_train), torch.as_tensor(data.y_train)
    n = len(y)
    c_avg: float | None = None
    s_avg = 1.0
    tau = cfg.tau0
    log_lam = math.log(cfg.lambda_init)
    hist: dict[str, list[float]] = {k: [] for k in ("iteration", "tau", "expected_fraction", "val_accuracy", "lambda")}
    perm = torch.randperm(n, generator=gen)
    pos = 0
    masked.train()
    bar = tqdm(range(cfg.iterations), desc="deepiot", disable=not progress, leave=False)
    for it in bar:
        if pos + cfg.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        xb, yb = X[idx].to(dev), y[idx].to(dev)
        B = len(idx)

        mats = group_matrices(structure, masked)
        probs = comp(mats)
        if cfg.schedule == "target":
            progress_frac = min(1.0, it / max(1.0, cfg.anneal * cfg.iterations))
            budget = cfg.target ** progress_frac
            tau = _threshold_for(cm, probs, budget, cfg.metric)
        else:
            tau = min(cfg.tau_max, cfg.tau0 + cfg.tau_step * (it // cfg.tau_every))
        p_hat = [torch.where(p < tau, cfg.gamma * p, p).clamp(_EPS, 1 - _EPS) for p in probs]
        z = [torch.bernoulli(p.detach().expand(B, -1)) for p in p_hat]

        # Critic: the masked network, trained through the sampled masks.
        state.set(z)
        tb = teacher_logits[idx].to(dev) if teacher_logits is not None else None
        loss_i = distillation_loss(masked(xb), yb, tb, kd, per_sample=True)  # (B,)
        opt_w.zero_grad(set_to_none=True)
        loss_i.mean().backward()
        opt_w.step()

        # Compressor: REINFORCE on the per-sample loss, baseline and scale from moving averages.
        ell = loss_i.detach()
        mean, std = float(ell.mean()), float(ell.std()) if B > 1 else 0.0
        if c_avg is None:
            c_avg, s_avg = mean, std
        adv = (ell - c_avg) / max(1.0, s_avg)  # advantage before the averages move
        logp = sum((zl * pl.log() + (1 - zl) * (1 - pl).log()).sum(1) for zl, pl in zip(z, p_hat))
        loss_c = (logp * adv).mean()
        expected = kept_fraction(cm, [p.double() for p in p_hat], cfg.metric, expected=True)
        if cfg.schedule == "target":
            loss_c = loss_c + math.exp(log_lam) * expected.float()
            budget = cfg.target ** min(1.0, it / max(1.0, cfg.anneal * cfg.iterations))
            log_lam += cfg.lambda_rate * math.log(float(expected.detach()) / budget)
            log_lam = min(max(log_lam, math.log(1e-4)), math.log(1e4))
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        opt_c.step()
        c_avg = cfg.baseline_decay * c_avg + (1 - cfg.baseline_decay) * mean
        s_avg = cfg.baseline_decay * s_avg + (1 - cfg.baseline_decay) * std

        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iterations:
            p_now = [p.detach().cpu().numpy() for p in probs]
            keep, _, frac = choose_mask(cm, p_now, max(cfg.target, float(expected.detach())), cfg.metric)
            state.set([torch.as_tensor(k, dtype=torch.float32, device=dev) for k in keep])
            val = accuracy(masked, data.X_val, data.y_val)
            masked.train()
            for key, v in (("iteration", it + 1), ("tau", tau), ("expected_fraction", float(expected.detach())),
                           ("val_accuracy", val), ("lambda", math.exp(log_lam))):
                hist[key].append(float(v))
            bar.set_postfix(frac=f"{float(expected.detach()):.4f}", tau=f"{tau:.3f}", val=f"{val:.3f}")
            if cfg.schedule == "paper":
                det = [np.asarray(p >= tau) for p in p_now]
                det_frac = float(kept_fraction(cm, [torch.as_tensor(k, dtype=torch.float64) for k in det], cfg.metric))
                if det_frac <= cfg.target:
                    break  # the paper's stop rule: the target is reached

    with torch.no_grad():
        final = [p.detach().cpu().numpy() for p in comp(group_matrices(structure, masked))]
    keep, tau_final, frac = choose_mask(cm, final, cfg.target, cfg.metric)
    state.set(None)
    return SearchResult(final, tau_final, keep, frac, it + 1, hist)
