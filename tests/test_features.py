"""Frozen-activation cache: same training as without it, reused across trials and runs."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transferstudy.config import TrainSection
from transferstudy.features import FeatureStore, estimate_bytes
from transferstudy.images import Augment, DeviceData, Views
from transferstudy.model import build_model, trainable_parameter_names
from transferstudy.splits import make_splits
from transferstudy.train import _train_logits, evaluate, fit


def _views(count: int, aug: Augment | None = None, seed: int = 0) -> Views:
    return Views(count, aug or Augment(), seed)


def _first_step(model, data, rows, settings, features, regime=None, view=0):
    """Logits, loss and trainable-parameter gradients of one training step on ``view`` of ``rows``
    (through the cache when ``features`` is given, else through the whole network); nothing is updated."""
    model.train()
    regime = regime or Views.from_settings(settings)
    logits = _train_logits(model, data, rows, regime, view, data.device, features)
    loss = F.cross_entropy(logits, data.targets(rows), label_smoothing=settings.label_smoothing)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 rounding, within 1e-9 of the tensor's scale. Frozen stages run on
    batches of other sizes differ by ~1e-15 in float64, and one step through the trainable stages
    amplifies that about a thousandfold (measured in fp32 at depth 2: 1e-6 in the activations,
    1e-3 in the gradients), which leaves hundreds-fold room; any real difference (another view,
    fp32 storage, live batch norm in a frozen stage) shows at 1e-7 or far above."""
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


#: (augment, view): the centre view without augmentation; with it, the mirror and a crop view.
VIEWS_TRAINED = {"centre": (False, 0), "mirror": (True, 1), "crop": (True, 3)}


@pytest.mark.parametrize("augment, view", VIEWS_TRAINED.values(), ids=VIEWS_TRAINED.keys())
@pytest.mark.parametrize("depth", [0, 2])
def test_training_from_the_cache_computes_what_the_whole_network_computes(tiny, cpu, depth, augment, view):
    # A training step on one view and a validation pass from the cache must equal the same step
    # and pass through the whole network, which builds that view of the batch's images on the
    # fly (one training regime, cached or not). Both run in float64 and are compared at
    # the first step: in fp32 the cache (built 128 images at a time) already differs from an
    # 8-image batch by ~1e-6 after the frozen stages, and AdamW turns that into percent-level
    # losses within an epoch at depth 2, by an amount that depends on the CPU's kernels.
    cache, _, pool = tiny
    data = DeviceData(cache, cpu, dtype=torch.float64)
    splits = make_splits(cache, 0.75, 0.0, 0)
    settings = TrainSection(batch_size=8, augment=augment, feature_views=4)
    regime = Views.from_settings(settings)
    assert regime.count == (4 if augment else 1)
    torch.manual_seed(0)
    whole = build_model(cache.num_classes, "none", depth)[0].double()
    cached = copy.deepcopy(whole)
    features = FeatureStore("t", regime, 0.5).get(cached, data, pool, cpu)
    features.ensure_view(view, cached, data, cpu)
    features.ensure_view(0, cached, data, cpu)  # for validation
    assert features.views.dtype == torch.float64  # the cache holds what the frozen stages computed
    rows = next(
        data.batch_rows(splits.train, settings.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    )

    logits, loss, grads = _first_step(whole, data, rows, settings, None, regime, view)
    cached_logits, cached_loss, cached_grads = _first_step(cached, data, rows, settings, features, regime, view)

    _assert_same(cached_logits, logits)
    _assert_same(cached_loss, loss)
    assert set(cached_grads) == set(grads) == trainable_parameter_names(whole)
    for name, grad in grads.items():
        _assert_same(cached_grads[name], grad)
    val = evaluate(whole, data, splits.val, cpu)
    cached_val = evaluate(cached, data, splits.val, cpu, features=features)
    np.testing.assert_allclose(cached_val.probs, val.probs, rtol=1e-5, atol=1e-7)  # evaluate returns fp32
    assert cached_val.loss == pytest.approx(val.loss, rel=1e-5)


def test_store_reuses_a_depth_across_trials_and_skips_depth_five(tiny, cpu):
    cache, data, pool = tiny
    store = FeatureStore("t", _views(3), 0.5)
    model, _ = build_model(cache.num_classes, "none", 1)
    first = store.get(model, data, pool, cpu)
    assert first.views.shape[:2] == (3, len(pool)) and first.depth == 1
    assert store.get(model, data, pool, cpu) is first
    model.set_unfreeze_depth(5)
    assert store.get(model, data, pool, cpu) is None
    model.set_unfreeze_depth(1)
    assert estimate_bytes(model, model.unfreeze_depth, cache.image_size, len(pool), 3, torch.float32) == first.nbytes


def test_views_are_centre_mirror_and_crops(tiny, cpu):
    cache, data, pool = tiny
    model, _ = build_model(cache.num_classes, "none", 0)
    features = FeatureStore("t", _views(4), 0.5).get(model, data, pool, cpu)
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
    store = FeatureStore("t", _views(4), 0.5)
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
    store = FeatureStore("t", _views(2), 0.5, disk_dir=tmp_path / "features")
    built = store.get(model, data, pool, cpu)
    built.ensure_view(0, model, data, cpu)
    store.save(built)
    assert list((tmp_path / "features").glob("features-*.pt"))
    loaded = FeatureStore("t", _views(2), 0.5, disk_dir=tmp_path / "features").get(model, data, pool, cpu)
    assert loaded.built == [True, False] and loaded.build_seconds == 0.0
    torch.testing.assert_close(loaded.views[0], built.views[0])
    other_rows = FeatureStore("t", _views(2), 0.5, disk_dir=tmp_path / "features")
    assert other_rows.get(model, data, np.asarray(pool[:-1]), cpu).built == [False, False]


def test_too_large_cache_is_skipped(tiny, cpu):
    cache, data, pool = tiny
    model, _ = build_model(cache.num_classes, "none", 2)
    assert FeatureStore("t", _views(2), memory_fraction=0.0).get(model, data, pool, cpu) is None


def test_building_a_view_fills_the_deeper_depths_on_the_way(tiny, cpu):
    cache, data, pool = tiny
    splits = make_splits(cache, 0.75, 0.0, 0)
    store = FeatureStore("t", _views(4), 0.5)
    settings = TrainSection(epochs=2, lr=1e-3, batch_size=8)
    head_only, _ = build_model(cache.num_classes, "none", 0)
    trainable = [n for n, p in head_only.named_parameters() if p.requires_grad]
    first = store.get(head_only, data, pool, cpu)
    assert (
        head_only.unfreeze_depth == 0 and [n for n, p in head_only.named_parameters() if p.requires_grad] == trainable
    )
    assert head_only.training and not any(
        stage.training for stage in head_only.stages
    )  # sizing the siblings left it as it was
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
