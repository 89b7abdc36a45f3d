"""train.py: fit / train_one_epoch / evaluate, schedules, optimisers, early stop, divergence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import write_class_folders

from transferstudy.config import TrainSection
from transferstudy.datasets import scan_folders
from transferstudy.images import DeviceData, load_cache
from transferstudy.model import build_model
from transferstudy.splits import make_splits
from transferstudy.train import (
    EpochRecord,
    NonFiniteLossError,
    best_epoch,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
)


def _data(root, cache_dir, size: int = 16):
    cache = load_cache(scan_folders(root), size, cache_dir, workers=1, show_progress=False)
    return cache, DeviceData(cache, torch.device("cpu"))


@pytest.fixture
def small(split_dataset, cache_dir):
    """(cache, device data, splits) of the 3-class split dataset: 9 train, 9 val, 6 holdout."""
    cache, data = _data(split_dataset, cache_dir)
    return cache, data, make_splits(cache, 0.5, 0.0, split_seed=0)


def test_fit_learns_a_tiny_dataset(tmp_path, cpu):
    # 4 colour classes x 20 images at 16 px; a new head learns them on a frozen random backbone.
    # Head-only training is logistic regression on fixed features: a convex problem that carries
    # a CPU's rounding (~1e-7) through its epochs unchanged, so these thresholds hold on every CPU
    # by wide margins. Whole-network training from random init on 8-image batches would not do:
    # it amplifies that rounding into percent-level differences in loss within one epoch.
    # (That every trainable stage updates is test_model's test_training_step_only_touches_trainable_stages.)
    root = write_class_folders(tmp_path / "colours", num_classes=4, per_class=20, test_per_class=None, size=16, seed=0)
    cache, data = _data(root, tmp_path / "cache")
    splits = make_splits(cache, 0.7, 0.0, split_seed=0)
    assert splits.sizes() == {"train": 56, "val": 24, "holdout": 0}
    torch.manual_seed(0)
    model, _ = build_model(4, weights="none", unfreeze_depth=0)
    settings = TrainSection(epochs=8, lr=3e-3, batch_size=8, train_seed=0, augment=False)

    result = fit(model, data, splits.train, splits.val, settings, cpu)

    losses = [r.train_loss for r in result.history]
    assert [r.epoch for r in result.history] == list(range(1, 9))
    assert np.mean(losses[-2:]) < 0.5 * losses[0], losses  # last epochs average out batch noise
    assert result.final.val_acc >= 0.5, [r.val_acc for r in result.history]  # chance = 0.25
    assert result.final.val_f1 >= 0.4
    best = max(result.history, key=lambda r: r.val_acc)
    assert result.history[result.best_epoch - 1].val_acc == best.val_acc
    assert not result.stopped_early
    assert result.history[0].lr == pytest.approx(3e-3)
    assert all(a.lr > b.lr for a, b in zip(result.history, result.history[1:]))  # cosine decay
    json.dumps(result.to_dict())  # plain values only


def test_best_epoch_follows_the_monitored_metric():
    # Accuracy peaks at epoch 2, macro-F1 at epoch 3: a macro-F1 study must name epoch 3.
    def rec(epoch, acc, f1):
        return EpochRecord(epoch, 1.0, 0.5, 1.0, acc, f1, 1e-3, 1.0, 10.0)

    history = [rec(1, 0.5, 0.4), rec(2, 0.8, 0.5), rec(3, 0.7, 0.6), rec(4, 0.8, float("nan"))]
    assert best_epoch(history) == 2  # earliest of the tied accuracies
    assert best_epoch(history, "val_acc") == 2
    assert best_epoch(history, "val_f1") == 3  # NaN never wins


def test_fit_is_reproducible_for_a_seed(small, cpu):
    _, data, splits = small

    def run(seed):
        torch.manual_seed(0)
        model, _ = build_model(3, weights="none", unfreeze_depth=1)
        s = TrainSection(epochs=2, lr=1e-3, batch_size=4, train_seed=seed)  # augmentation on
        history = fit(model, data, splits.train, splits.val, s, cpu).history
        return [(r.train_loss, r.val_loss) for r in history], model.head.weight.detach().clone()

    (h1, w1), (h2, w2), (h3, _) = run(0), run(0), run(1)
    assert h1 == h2 and torch.equal(w1, w2)
    assert h1 != h3


def test_fit_keeps_frozen_stages_untouched(small, cpu):
    _, data, splits = small
    model, _ = build_model(3, weights="none", unfreeze_depth=2)
    frozen = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith(("stages.0.", "stages.1.", "stages.2."))
    }
    trainable = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("stages.3.")}
    fit(model, data, splits.train, splits.val, TrainSection(epochs=1, lr=1e-2, batch_size=4, weight_decay=0.5), cpu)
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    assert any(not torch.equal(state[k], v) for k, v in trainable.items())


def test_on_epoch_end_sees_every_epoch_and_can_stop(small, cpu):
    _, data, splits = small
    model, _ = build_model(3, weights="none", unfreeze_depth=0)
    seen: list[EpochRecord] = []

    def stop_after_two(record):
        seen.append(record)
        return record.epoch == 2

    result = fit(
        model, data, splits.train, splits.val, TrainSection(epochs=5, lr=1e-3, batch_size=4), cpu, stop_after_two
    )
    assert [r.epoch for r in seen] == [1, 2]
    assert result.history == seen and result.stopped_early
    assert "val_acc" in seen[0].log_line() and "train_loss" in seen[0].log_line()


def test_on_epoch_end_exception_ends_fit(small, cpu):
    _, data, splits = small
    model, _ = build_model(3, weights="none", unfreeze_depth=0)

    class Pruned(Exception):
        pass

    def prune(record):
        raise Pruned

    with pytest.raises(Pruned):
        fit(model, data, splits.train, splits.val, TrainSection(epochs=3, batch_size=4), cpu, prune)


def test_nan_loss_raises(small, cpu):
    _, data, splits = small
    model, _ = build_model(3, weights="none", unfreeze_depth=0)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        fit(model, data, splits.train, splits.val, TrainSection(epochs=1, batch_size=4), cpu)


def test_evaluate(small, cpu):
    cache, data, splits = small
    model, _ = build_model(3, weights="none", unfreeze_depth=0)
    result = evaluate(model, data, splits.holdout, cpu, batch_size=4)
    assert result.probs.shape == (6, 3)
    np.testing.assert_allclose(result.probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(result.labels, cache.labels[splits.holdout])
    assert math.isfinite(result.loss)
    scores = result.scores(3)
    assert scores.accuracy == pytest.approx(result.accuracy)
    assert scores.confusion.sum() == 6
    assert not model.training

    empty = evaluate(model, data, np.zeros(0, dtype=np.int64), cpu)
    assert math.isnan(empty.loss) and math.isnan(empty.accuracy) and empty.probs.shape == (0, 3)
    assert math.isnan(empty.scores(3).macro_f1) and empty.scores(3).confusion.shape == (3, 3)


def _scheduled_lrs(steps_per_epoch: int, s: TrainSection) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.lr)
    sched = build_scheduler(opt, steps_per_epoch, s)
    lrs = []
    for _ in range(steps_per_epoch * s.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_warmup_then_cosine_to_zero():
    lrs = _scheduled_lrs(10, TrainSection(epochs=3, lr=0.1, warmup_epochs=0.5))
    assert len(lrs) == 30
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6]))  # linear warm-up over 5 steps
    assert lrs[5] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))  # then cosine decay
    assert lrs[-1] < 0.002
    no_warmup = _scheduled_lrs(4, TrainSection(epochs=2, lr=0.1))
    assert no_warmup[0] == pytest.approx(0.1)


def test_build_optimizer(cpu):
    model, _ = build_model(3, weights="none", unfreeze_depth=1)
    adamw = build_optimizer(model, TrainSection(lr=0.02, backbone_lr_mult=0.25, weight_decay=0.3), cpu)
    assert isinstance(adamw, torch.optim.AdamW)
    lrs = {g["name"]: g["lr"] for g in adamw.param_groups}
    assert lrs == {"head": 0.02, "head_no_decay": 0.02, "backbone": 0.005, "backbone_no_decay": 0.005}
    sgd = build_optimizer(model, TrainSection(optimizer="sgd", momentum=0.8), cpu)
    assert isinstance(sgd, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in sgd.param_groups)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer(model, TrainSection(optimizer="lion"), cpu)
