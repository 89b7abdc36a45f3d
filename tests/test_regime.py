"""One training regime per study: the frozen-activation cache is a pure speed-up.

Every trial trains on the same V fixed views of each image (``images.batches.Views``), epoch e
on view (e - 1) mod V, whether its frozen activations come from the cache, the cache does not
fit, or nothing is frozen (depth 5). These tests compare the images the stem receives, exactly;
the first-step equivalence of cached and uncached training on a crop view is in test_features.
The cache's keys (weights content, dtype, device) are tested at the end.
"""

from __future__ import annotations

import numpy as np
import optuna
import torch
import torchvision
from helpers import tiny_config

import transferstudy.features as features_mod
from transferstudy import study as study_mod
from transferstudy.config import TrainSection
from transferstudy.features import FeatureStore
from transferstudy.images import Augment, DeviceData, Views
from transferstudy.model import build_model
from transferstudy.study import objective as objective_mod
from transferstudy.trial import TrialRunner

V = 4
#: Augmentation on, four views (centre, mirror, two crops), four epochs: every view is used once.
SETTINGS = TrainSection(
    weights="none", epochs=V, lr=1e-3, batch_size=8, train_ratio=0.75, augment=True, feature_views=V
)


def record_stem(model, only_training: bool = False) -> list[torch.Tensor]:
    """Every batch the network's stem receives from now on (during training only, when asked:
    validation passes run the stem too)."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        if model.training or not only_training:
            seen.append(args[0].detach().clone())

    model.stages[0].register_forward_pre_hook(hook)
    return seen


def record_training_rows(data: DeviceData, monkeypatch) -> list[list[torch.Tensor]]:
    """The rows of every training batch (shuffled ``batch_rows``), one list per epoch."""
    epochs: list[list[torch.Tensor]] = []
    original = data.batch_rows

    def batch_rows(indices, batch_size, shuffle=False, generator=None):
        if shuffle:
            epochs.append([])
        for rows in original(indices, batch_size, shuffle, generator):
            if shuffle:
                epochs[-1].append(rows.clone())
            yield rows

    monkeypatch.setattr(data, "batch_rows", batch_rows)
    return epochs


def run_recorded(runner: TrialRunner, settings: TrainSection, monkeypatch):
    """Run one trial; return (outcome, regime given to on_start, the stem's inputs in training
    with the rows of each batch per epoch, or every stem input when training reads the cache)."""
    model = runner.build(settings.unfreeze_depth)
    monkeypatch.setattr(runner, "build", lambda depth: model)
    runner.feature_cache(model, settings)  # sized first: its dry runs through the stem are not recorded
    stem = record_stem(model, only_training=True)
    builds = record_stem(model)  # the cache's build passes run the stem in eval mode
    epochs = record_training_rows(runner.data, monkeypatch)
    started = {}
    outcome = runner.run_trial(settings, on_start=lambda splits, regime: started.update(regime))
    monkeypatch.undo()
    return outcome, started, stem, epochs, builds


def test_uncached_and_depth_five_trials_train_on_the_cached_views(tiny, cpu, monkeypatch):
    cache, data, pool = tiny
    runner = TrialRunner(cache, "none", cpu, holdout_fraction=0.0, device_data=data)

    cached, regime, stem, _, builds = run_recorded(runner, SETTINGS.with_params({"unfreeze_depth": 2}), monkeypatch)
    features = cached.features
    assert features is not None and features.built == [True] * V and not stem  # training read the cache
    # The build passes ran view 0, 1, 2, 3 in turn, each over the cache's rows in order.
    n = len(features.rows)
    built = torch.cat(builds)
    assert len(built) == V * n
    position = {int(r): i for i, r in enumerate(features.rows)}

    def cached_view(view: int, rows: torch.Tensor) -> torch.Tensor:
        return built[view * n + torch.tensor([position[int(r)] for r in rows])]

    assert regime == {**runner.regime(SETTINGS).describe(), "cache": "host"} and regime["views"] == V

    for depth, change in ((2, {"feature_memory_fraction": 0.0}), (5, {})):
        uncached, uncached_regime, stem, epochs, _ = run_recorded(
            runner, SETTINGS.with_params({"unfreeze_depth": depth, **change}), monkeypatch
        )
        assert uncached.features is None
        assert uncached_regime == {**regime, "cache": "none"}
        assert len(epochs) == V and len(stem) == sum(len(batches) for batches in epochs)
        inputs = iter(stem)
        for epoch, batches in enumerate(epochs, start=1):
            for rows in batches:
                assert torch.equal(next(inputs), cached_view((epoch - 1) % V, rows)), (depth, epoch)
    assert not torch.equal(cached_view(2, features.rows[:4]), cached_view(3, features.rows[:4]))  # crops differ


def build_inputs(model, data, rows, regime: Views, monkeypatch, batch: int) -> dict[int, torch.Tensor]:
    """Per cache row, the pixels of every view as a cache built ``batch`` images at a time, in
    the order of ``rows``, fed its frozen stages; and that cache."""
    monkeypatch.setattr(features_mod, "BUILD_BATCH", batch)
    features = FeatureStore("t", regime, 0.5).get(model, data, rows, data.device)
    seen = record_stem(model)  # after sizing the cache, whose dry runs go through the stem
    for view in range(regime.count):
        features.ensure_view(view, model, data, data.device)
    per_view = torch.cat(seen).view(regime.count, len(rows), *seen[0].shape[1:])
    order = np.argsort(rows)
    return per_view[:, order], features.views[:, order]


def test_views_do_not_depend_on_batch_size_or_build_order(tiny, cpu, monkeypatch):
    cache, _, pool = tiny
    data = DeviceData(cache, cpu, dtype=torch.float64)
    model = build_model(cache.num_classes, "none", 1)[0].double()
    regime = Views(V, Augment(), seed=3)

    pixels, activations = build_inputs(model, data, pool, regime, monkeypatch, batch=128)
    other_pixels, other_activations = build_inputs(model, data, pool[::-1].copy(), regime, monkeypatch, batch=5)

    assert torch.equal(other_pixels, pixels)  # the same views, to the bit
    # Their frozen activations differ by rounding only (another batch size, another summation order).
    torch.testing.assert_close(other_activations, activations, rtol=1e-9, atol=1e-9 * activations.abs().max().item())
    # Centre and mirror need no seed; the crops follow it.
    reseeded, _ = build_inputs(model, data, pool, Views(V, Augment(), seed=4), monkeypatch, batch=128)
    assert torch.equal(reseeded[:2], pixels[:2]) and not torch.equal(reseeded[2:], pixels[2:])


def test_without_augmentation_every_epoch_trains_on_the_centre_view(tiny, cpu):
    cache, data, _ = tiny
    runner = TrialRunner(cache, "none", cpu, holdout_fraction=0.0, device_data=data)
    regime = runner.regime(SETTINGS.with_params({"augment": False}))
    assert regime.count == 1 and [regime.for_epoch(e) for e in (1, 2, 3)] == [0, 0, 0]
    rows = torch.arange(4)
    assert torch.equal(regime.inputs(data, rows, 0), data.inputs(rows))


def test_every_trial_records_its_regime_from_its_start(tmp_path, monkeypatch):
    # A trial pruned at its first epoch still says which views it trained on and where their
    # frozen activations were; the study says which views all of its trials train on.
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path)
    objective = study_mod.Objective(cfg, study_mod.decode_dataset(cfg, show_progress=False), torch.device("cpu"))

    def prune(*args, **kwargs):
        raise optuna.TrialPruned

    monkeypatch.setattr(objective_mod, "report_epoch", prune)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"unfreeze_depth": 1, "lr": 1e-3, "epochs": 2, "train_ratio": 0.7})
    study.optimize(objective, n_trials=1)

    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    expected = {
        "views": 4,
        "augment": True,
        "crop_scale": [0.35, 1.0],
        "crop_ratio": [0.75, 4 / 3],
        "hflip": True,
        "seed": 0,
    }
    assert study.user_attrs["regime"] == expected
    assert trial.user_attrs["regime"] == {**expected, "cache": "host"}


# --------------------------------------------------------------------------- cache keys


def write_weights(path, seed: int) -> None:
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet50().state_dict(), path)


def test_weights_replaced_at_the_same_path_are_never_served_stale_features(tiny, cpu, tmp_path):
    cache, data, _ = tiny
    weights = tmp_path / "resnet50.pth"
    write_weights(weights, 0)
    settings = SETTINGS.with_params({"unfreeze_depth": 0, "epochs": 1})

    def runner() -> TrialRunner:
        return TrialRunner(
            cache, str(weights), cpu, holdout_fraction=0.0, feature_dir=tmp_path / "features", device_data=data
        )

    first = runner()
    first.run_trial(settings)
    (saved,) = (tmp_path / "features").glob("features-*.pt")
    again = runner()
    assert again.weights_digest == first.weights_digest
    assert again.feature_cache(again.build(0), settings).built == [
        True,
        False,
        False,
        False,
    ]  # the same weights: reused

    write_weights(weights, 1)  # other values, same path and name
    replaced = runner()
    assert replaced.weights_digest != first.weights_digest
    model = replaced.build(0)
    features = replaced.feature_cache(model, settings)
    assert features.built == [False] * V  # not the old file's
    features.ensure_view(0, model, data, cpu)
    centre = model.eval().frozen_features(data.inputs(torch.as_tensor(features.rows[:4])))
    torch.testing.assert_close(features.views[0, :4], centre, rtol=1e-3, atol=1e-4)
    replaced.features.save(features)
    assert saved.is_file() and len(list((tmp_path / "features").glob("features-*.pt"))) == 2


def test_another_dtype_or_device_is_another_key_and_a_renamed_file_is_refused(tiny, cpu, tmp_path, caplog):
    cache, _, pool = tiny
    regime = Views(2, Augment(), 0)
    store = FeatureStore("t", regime, 0.5, disk_dir=tmp_path)
    keys = {
        store.key(0, cache.image_size, dtype, torch.device(kind))
        for dtype in (torch.float32, torch.float64, torch.bfloat16)
        for kind in ("cpu", "cuda")
    }
    assert len(keys) == 6
    assert store.key(0, cache.image_size, torch.float32, cpu) != FeatureStore("t", Views(2, Augment(), 1), 0.5).key(
        0, cache.image_size, torch.float32, cpu
    )

    wide = DeviceData(cache, cpu, dtype=torch.float64)
    double = build_model(cache.num_classes, "none", 0)[0].double()
    built = store.get(double, wide, pool, cpu)
    built.ensure_view(0, double, wide, cpu)
    store.save(built)
    (path,) = tmp_path.glob("features-*.pt")

    single = build_model(cache.num_classes, "none", 0)[0]
    single.load_state_dict(double.float().state_dict())
    narrow = DeviceData(cache, cpu)
    assert FeatureStore("t", regime, 0.5, disk_dir=tmp_path).get(single, narrow, pool, cpu).built == [False, False]

    # The float64 file under the float32 key's name: its recorded key gives it away.
    fp32_key = store.key(0, cache.image_size, torch.float32, cpu)
    path.rename(tmp_path / f"features-{fp32_key}.pt")
    features = FeatureStore("t", regime, 0.5, disk_dir=tmp_path).get(single, narrow, pool, cpu)
    assert features.built == [False, False] and "made for cache key" in caplog.text
