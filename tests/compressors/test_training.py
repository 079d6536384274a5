"""The training loop's checkpoint rule (which validation epoch ``train`` hands back), its
translated copies of training images (``TrainConfig.shift``) and its noisy views for consistent
distillation (``TrainConfig.views``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from deepfleet.compressors.training import (
    TrainConfig,
    batches,
    epoch_batches,
    jittered,
    logits_of,
    shift_offsets,
    train,
    training_set,
    training_tensors,
    translate,
    validation_score,
)
from deepfleet.data import Dataset
from deepfleet.errors import ConfigError


@pytest.fixture(scope="module")
def separable() -> Dataset:
    """Two far-apart blobs: validation accuracy reaches 1.0 within an epoch or two and then
    ties for every later epoch while the cross-entropy keeps falling."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=320)
    X = (rng.normal(size=(320, 1, 8)) + 3.0 * (2 * y[:, None, None] - 1)).astype(np.float32)
    return Dataset(name="blobs", X_train=X[:192], y_train=y[:192], X_val=X[192:256], y_val=y[192:256],
                   X_test=X[256:], y_test=y[256:], num_classes=2, fingerprint="blobs")


def _run(data: Dataset, select: str) -> tuple[nn.Module, list[tuple[float, float]]]:
    """Train a linear model for 12 epochs; return it and every epoch's (accuracy, loss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    seen: list[tuple[float, float]] = []

    def record(epoch: int, val: float) -> None:
        acc, key = validation_score(model, data, "loss")
        seen.append((acc, -key[0]))

    cfg = TrainConfig(epochs=12, patience=12, lr=0.05, batch_size=32, select=select)
    model, _ = train(model, data, cfg, seed=0, progress=False, on_epoch=record)
    return model, seen


def test_accuracy_ties_go_to_the_lowest_loss(separable: Dataset) -> None:
    tie_broken, seen = _run(separable, "accuracy+loss")
    first_best, seen_again = _run(separable, "accuracy")
    assert seen == seen_again  # same seed, same trajectory: only the kept epoch differs
    best_acc = max(a for a, _ in seen)
    tied = [loss for a, loss in seen if a == best_acc]
    assert len(tied) >= 3 and min(tied) < tied[0]  # the case the rule is for
    acc, key = validation_score(tie_broken, separable, "accuracy+loss")
    assert acc == best_acc and -key[1] == pytest.approx(min(tied), rel=1e-6)
    acc, key = validation_score(first_best, separable, "accuracy+loss")
    assert acc == best_acc and -key[1] == pytest.approx(tied[0], rel=1e-6)


def test_select_loss_keeps_the_lowest_loss_epoch(separable: Dataset) -> None:
    model, seen = _run(separable, "loss")
    _, key = validation_score(model, separable, "loss")
    assert -key[0] == pytest.approx(min(loss for _, loss in seen), rel=1e-6)


def test_select_last_keeps_the_final_epoch_and_never_stops_early(separable: Dataset) -> None:
    def fit(select: str) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
        states: list[dict[str, torch.Tensor]] = []
        cfg = TrainConfig(epochs=8, patience=1, lr=0.05, batch_size=32, select=select)
        model, _ = train(model, separable, cfg, seed=0, progress=False,
                         on_epoch=lambda e, v: states.append(copy.deepcopy(model.state_dict())))
        return model, states

    _, stopped = fit("accuracy")
    last, states = fit("last")
    assert len(stopped) < 8 and len(states) == 8  # validation ties from epoch 2: patience 1 stops a comparing rule
    final = last.state_dict()
    assert all(torch.equal(final[k], states[-1][k]) for k in final)
    assert not all(torch.equal(final[k], states[-2][k]) for k in final)


def test_unknown_select_rule_is_named() -> None:
    with pytest.raises(ConfigError, match="'newest'.*accuracy\\+loss|accuracy\\+loss.*'newest'"):
        TrainConfig(select="newest")


def test_shift_offsets_are_every_offset_at_that_manhattan_distance() -> None:
    assert shift_offsets(0) == []
    for shift in (1, 2, 3):
        offs = shift_offsets(shift)
        want = {(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
                if abs(dy) + abs(dx) == shift}
        assert len(offs) == 4 * shift and set(offs) == want


def test_translate_moves_the_image_and_repeats_the_edge() -> None:
    X = torch.zeros(1, 1, 6, 6)
    X[0, 0, 2, 3] = 1.0  # one bright pixel away from the border
    X[0, 0, 5, :] = 0.5  # the bottom row, to see the edge repeated
    moved = translate(X, 1, -2)  # down 1, left 2: the bottom row leaves the frame
    assert moved[0, 0, 3, 1] == 1.0 and moved.sum() == pytest.approx(1.0)
    up = translate(X, -2, 0)  # up 2: the bottom row moves to row 3 and is repeated below it
    assert up[0, 0, 0, 3] == 1.0 and up.sum() == pytest.approx(1.0 + 0.5 * 6 * 3)
    assert torch.all(up[0, 0, 3:, :] == 0.5)


def test_training_tensors_add_shifted_images_and_leave_sequences_alone(tiny_digits: Dataset, tiny_sequences: Dataset) -> None:
    X, y = training_tensors(tiny_digits, TrainConfig(shift=2))
    n = len(tiny_digits.y_train)
    assert X.shape == (9 * n, *tiny_digits.X_train.shape[1:]) and torch.equal(y, torch.as_tensor(tiny_digits.y_train).repeat(9))
    assert torch.equal(X[:n], torch.as_tensor(tiny_digits.X_train))  # the originals come first, unchanged
    assert torch.equal(X[n : 2 * n], translate(torch.as_tensor(tiny_digits.X_train), *shift_offsets(2)[0]))
    Xs, ys = training_tensors(tiny_sequences, TrainConfig(shift=2))
    assert torch.equal(Xs, torch.as_tensor(tiny_sequences.X_train)) and len(ys) == len(tiny_sequences.y_train)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_a_bad_shift_is_named(bad: object) -> None:
    with pytest.raises(ConfigError, match=f"shift.*{bad!r}"):
        TrainConfig(shift=bad)  # type: ignore[arg-type]


def test_a_view_scales_each_channel_and_adds_noise_of_the_jitter() -> None:
    X = torch.ones(4000, 3, 50)
    view = jittered(X, 0.2, torch.Generator().manual_seed(0))
    gains = view.mean(2)  # the noise averages out over a channel's 50 steps: the gain is left
    assert gains.std().item() == pytest.approx(0.2, rel=0.05) and gains.mean().item() == pytest.approx(1.0, abs=0.01)
    noise = view - view.mean(2, keepdim=True)
    assert noise.std().item() == pytest.approx(0.2, rel=0.05)
    again = jittered(X, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(view, again)  # a view is a function of its seed


def test_every_batch_carries_the_teachers_outputs_for_the_version_it_drew(tiny_sequences: Dataset) -> None:
    """Consistency: the teacher's outputs that a batch distils from are the teacher's outputs
    for exactly the inputs in that batch, whichever noisy version each sample came from."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(6 * 12, 4))
    cfg = TrainConfig(views=3, jitter=0.3, kd_alpha=0.5, batch_size=50)
    ts = training_set(tiny_sequences, cfg, teacher, seed=1)
    n = len(tiny_sequences.y_train)
    assert ts.X.shape == (4, n, 6, 12) and ts.teacher is not None and ts.teacher.shape == (4, n, 4)
    assert torch.equal(ts.X[0], torch.as_tensor(tiny_sequences.X_train))  # the clean version first
    gen = torch.Generator().manual_seed(0)
    epochs = [list(epoch_batches(ts, cfg.batch_size, gen, torch.device("cpu"))) for _ in range(2)]
    for epoch in epochs:
        xs = torch.cat([xb for xb, _, _ in epoch])
        assert len(xs) == n and sorted(torch.cat([yb for _, yb, _ in epoch]).tolist()) == sorted(ts.y.tolist())
        for xb, _, tb in epoch:
            assert torch.allclose(tb, logits_of(teacher, xb), atol=1e-5)
    drawn = torch.cat([xb for xb, _, _ in epochs[0]]).flatten(1)
    is_clean = (drawn[:, None, :] == ts.X[0].flatten(1)[None]).all(2).any(1)
    assert 0.1 < is_clean.float().mean().item() < 0.45  # about 1 in 4 samples is the clean version


def test_without_views_an_epoch_is_the_plain_shuffle(tiny_sequences: Dataset) -> None:
    """views 0 draws nothing more than the shuffle, so runs from before the views reproduce."""
    ts = training_set(tiny_sequences, TrainConfig(), None, seed=0)
    assert ts.X.shape[0] == 1 and ts.teacher is None
    gen, plain = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = [xb for _ in range(3) for xb, _, _ in epoch_batches(ts, 64, gen, torch.device("cpu"))]
    X = torch.as_tensor(tiny_sequences.X_train)
    want = [X[idx] for _ in range(3) for idx in batches(len(X), 64, plain)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize(("key", "bad", "needle"), [("views", -1, "views must be a whole number >= 0"),
                                                    ("views", 2.5, "views must be a whole number >= 0"),
                                                    ("jitter", 0, "jitter must be a number > 0"),
                                                    ("jitter", "0.1", "jitter must be a number > 0")])
def test_bad_views_are_named(key: str, bad: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=f"{needle}, but got {bad!r}"):
        TrainConfig(**{key: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3e11, "3e11", True])
def test_a_bad_work_budget_is_named(bad: object) -> None:
    with pytest.raises(ConfigError, match=f"work must be a positive number.*null.*{bad!r}"):
        TrainConfig(work=bad)  # type: ignore[arg-type]


def test_a_user_can_lift_the_fine_tuning_budget() -> None:
    """``--set finetune.work=null`` with ``finetune.epochs=800``: DeepSense fine-tunes 800 epochs,
    not the ~16 the budget allows (the recipe of benchmarks/compress.py's sensing-user parts)."""
    from deepfleet.api import FINETUNE, finetune_config
    from deepfleet.compressors.training import fit_budget

    capped = finetune_config(FINETUNE, {"epochs": 800})
    lifted = finetune_config(FINETUNE, {"epochs": 800, "work": None})
    assert fit_budget(capped, 4000, 4.6e6).epochs < 60
    assert fit_budget(lifted, 4000, 4.6e6).epochs == 800


def test_training_budgets_scale_with_the_data_and_leave_the_digits_models_alone() -> None:
    import dataclasses

    from deepfleet.api import BASE_TRAINING, FINETUNE
    from deepfleet.compressors._deepiot import DeepIoTConfig, search_iterations
    from deepfleet.compressors._export import export_graph
    from deepfleet.compressors.training import fit_budget, macs_per_sample
    from deepfleet.models import build_model

    macs = {}
    for name, shape in (("lenet5", (1, 28, 28)), ("mlp", (1, 28, 28)), ("deepsense", (6, 100))):
        model = build_model(name, input_shape=shape, num_classes=6).eval()
        macs[name] = macs_per_sample(model, torch.randn(2, *shape))
        assert macs[name] == export_graph(model, shape).macs  # counted as the exporter counts
    for name in ("lenet5", "mlp"):  # 1097 digits: 60 epochs, 3000 iterations, as before budgets
        assert fit_budget(BASE_TRAINING, 1097, macs[name]).epochs == 60
        assert fit_budget(FINETUNE, 1097, macs[name]).epochs == 60
        assert search_iterations(DeepIoTConfig(), macs[name]) == 3000
    # 4000 windows of 100 steps: a fraction of that, in proportion to the work
    assert fit_budget(BASE_TRAINING, 4000, macs["deepsense"]).epochs == 10
    assert 950 <= search_iterations(DeepIoTConfig(), macs["deepsense"]) <= 990
    assert fit_budget(BASE_TRAINING, 4000, 1e12).epochs == 5  # never below MIN_EPOCHS
    assert search_iterations(DeepIoTConfig(work=None), macs["deepsense"]) == 3000
    unbounded = dataclasses.replace(BASE_TRAINING, work=None)
    assert fit_budget(unbounded, 4000, macs["deepsense"]).epochs == 60


def test_the_base_cache_key_ignores_a_budget_that_does_not_bind(digits) -> None:
    import dataclasses

    from deepfleet.api import BASE_TRAINING, _base_key
    from deepfleet.compressors.training import fit_budget
    from deepfleet.models import build_model

    model = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    budgeted = fit_budget(BASE_TRAINING, len(digits.y_train), 2.29e6)
    plain = dataclasses.replace(BASE_TRAINING, work=None)
    assert _base_key("lenet5", digits, 0, budgeted, model) == _base_key("lenet5", digits, 0, plain, model)
