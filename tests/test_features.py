"""Frozen-activation cache: same training as without it, reused across trials and runs."""

import copy

import numpy as np
import pytest
import torch

from transferstudy.config import TrainSection
from transferstudy.datasets import scan_folders
from transferstudy.features import FeatureStore, estimate_bytes
from transferstudy.images import Augment, DeviceData, load_cache
from transferstudy.model import build_model
from transferstudy.splits import holdout_indices, make_splits
from transferstudy.train import fit


@pytest.fixture
def tiny(make_dataset, cache_dir, cpu):
    cache = load_cache(scan_folders(make_dataset(num_classes=3, per_class=8, size=32)), 32, cache_dir, show_progress=False)
    pool, _ = holdout_indices(cache, 0.0, 0)
    return cache, DeviceData(cache, cpu), pool


@pytest.mark.parametrize("depth", [0, 2])
def test_one_view_without_augmentation_matches_uncached_training(tiny, cpu, depth):
    cache, data, pool = tiny
    splits = make_splits(cache, 0.75, 0.0, 0)
    settings = TrainSection(epochs=3, lr=3e-3, batch_size=8, backbone_lr_mult=1.0, augment=False)
    torch.manual_seed(0)
    plain, _ = build_model(cache.num_classes, "none", depth)
    cached = copy.deepcopy(plain)
    uncached_run = fit(plain, data, splits.train, splits.val, settings, cpu)
    features = FeatureStore("t", 1, settings.augment, 0, 0.5).get(cached, data, pool, cpu)
    cached_run = fit(cached, data, splits.train, splits.val, settings, cpu, features=features)
    for a, b in zip(uncached_run.history, cached_run.history):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4, abs=1e-5)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4, abs=1e-5)


def test_store_reuses_a_depth_across_trials_and_skips_depth_five(tiny, cpu):
    cache, data, pool = tiny
    store = FeatureStore("t", 3, Augment(), 0, 0.5)
    model, _ = build_model(cache.num_classes, "none", 1)
    first = store.get(model, data, pool, cpu)
    assert first.views.shape[:2] == (3, len(pool)) and first.depth == 1
    assert store.get(model, data, pool, cpu) is first
    model.set_unfreeze_depth(5)
    assert store.get(model, data, pool, cpu) is None
    model.set_unfreeze_depth(1)
    assert estimate_bytes(model, model.unfreeze_depth, 32, len(pool), 3, torch.float32) == first.nbytes


def test_views_are_centre_mirror_and_crops(tiny, cpu):
    cache, data, pool = tiny
    model, _ = build_model(cache.num_classes, "none", 0)
    features = FeatureStore("t", 4, Augment(), 0, 0.5).get(model, data, pool, cpu)
    assert features.built == [False] * 4  # nothing is computed before training needs it
    for v in range(4):
        features.ensure_view(v, model, data, cpu)
    views = features.views
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[2], views[3])
    centre = model.eval().frozen_features(next(data.batches(pool[:4], 4))[0])
    torch.testing.assert_close(views[0, :4], centre, rtol=1e-3, atol=1e-4)  # other batch size, other summation order


def test_views_are_built_on_first_use_and_reused_by_later_trials(tiny, cpu):
    cache, data, pool = tiny
    splits = make_splits(cache, 0.75, 0.0, 0)
    store = FeatureStore("t", 4, Augment(), 0, 0.5)
    settings = TrainSection(epochs=3, lr=1e-3, batch_size=8)
    first_model, _ = build_model(cache.num_classes, "none", 1)
    features = store.get(first_model, data, pool, cpu)
    fit(first_model, data, splits.train, splits.val, settings, cpu, features=features)
    assert features.built == [True, True, True, False]  # epochs 1-3 used views 0-2
    spent = features.build_seconds
    second_model, _ = build_model(cache.num_classes, "none", 1)
    assert store.get(second_model, data, pool, cpu) is features
    fit(second_model, data, make_splits(cache, 0.5, 0.0, 0).train, splits.val, settings, cpu, features=features)
    assert features.build_seconds == spent  # a later trial of the same depth runs no frozen stage


def test_depth_zero_cache_is_kept_on_disk(tiny, cpu, tmp_path):
    cache, data, pool = tiny
    model, _ = build_model(cache.num_classes, "none", 0)
    store = FeatureStore("t", 2, Augment(), 0, 0.5, disk_dir=tmp_path / "features")
    built = store.get(model, data, pool, cpu)
    built.ensure_view(0, model, data, cpu)
    store.save(built, 32)
    assert list((tmp_path / "features").glob("features-*.pt"))
    loaded = FeatureStore("t", 2, Augment(), 0, 0.5, disk_dir=tmp_path / "features").get(model, data, pool, cpu)
    assert loaded.built == [True, False] and loaded.build_seconds == 0.0
    torch.testing.assert_close(loaded.views[0], built.views[0])
    other_rows = FeatureStore("t", 2, Augment(), 0, 0.5, disk_dir=tmp_path / "features")
    assert other_rows.get(model, data, np.asarray(pool[:-1]), cpu).built == [False, False]


def test_too_large_cache_is_skipped(tiny, cpu):
    cache, data, pool = tiny
    model, _ = build_model(cache.num_classes, "none", 2)
    assert FeatureStore("t", 2, Augment(), 0, memory_fraction=0.0).get(model, data, pool, cpu) is None


def test_building_a_view_fills_the_deeper_depths_on_the_way(tiny, cpu):
    cache, data, pool = tiny
    splits = make_splits(cache, 0.75, 0.0, 0)
    store = FeatureStore("t", 4, Augment(), 0, 0.5)
    settings = TrainSection(epochs=2, lr=1e-3, batch_size=8)
    head_only, _ = build_model(cache.num_classes, "none", 0)
    trainable = [n for n, p in head_only.named_parameters() if p.requires_grad]
    first = store.get(head_only, data, pool, cpu)
    assert head_only.unfreeze_depth == 0 and [n for n, p in head_only.named_parameters() if p.requires_grad] == trainable
    assert head_only.training and not any(stage.training for stage in head_only.stages)  # sizing the siblings left it as it was
    fit(head_only, data, splits.train, splits.val, settings, cpu, features=first)
    deeper, _ = build_model(cache.num_classes, "none", 2)
    deeper.load_state_dict({k: v for k, v in head_only.state_dict().items() if not k.startswith("head.")}, strict=False)
    features = store.get(deeper, data, pool, cpu)
    assert features.built == [True, True, False, False] and features.build_seconds == 0.0  # filled by depth 0's pass
    centre = deeper.eval().frozen_features(next(data.batches(pool[:4], 4))[0])
    torch.testing.assert_close(features.views[0, :4], centre, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(head_only.eval().frozen_features(next(data.batches(pool[:4], 4))[0], depth=2), centre)
    fit(deeper, data, splits.train, splits.val, settings, cpu, features=features)
    assert features.build_seconds == 0.0  # its first trial ran no frozen stage
