"""One trial, without Optuna: the settings in, a trained network and its scores out.

``TrialRunner`` holds what every trial of one process shares (the images on the device, the
backbone weights, the frozen-activation caches); ``run_trial`` trains one configuration on
its split. The Optuna objective (``study.objective``) and the benchmarks both call it, so a
benchmark measures exactly what a study runs.

    >>> runner = TrialRunner(cache, weights="none", device=torch.device("cpu"))
    >>> outcome = runner.run_trial(TrainSection(unfreeze_depth=1, epochs=3))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import runtime
from .config import TrainSection
from .features import FeatureCache, FeatureStore, placement_name, weights_digest
from .images.batches import DeviceData, Views
from .images.cache import ImageCache
from .model import TransferNet, build_model, build_on_backbone
from .splits import Splits, holdout_indices, make_splits
from .train import EpochRecord, FitResult, fit

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    """What one trial produced: the trained network (in place), its splits and its history."""

    model: TransferNet
    splits: Splits
    result: FitResult
    features: FeatureCache | None
    seconds: float
    settings: TrainSection | None = None  # as trained: unset backbone-dependent keys resolved


class TrialRunner:
    """What every trial of one process shares, built once.

    Args:
        cache: the decoded dataset.
        weights: the backbone weights (``model.build_model``); obtained here, once, so unusable
            weights end a study before any trial.
        holdout_fraction, split_seed: the study's holdout and split seeds (``splits``).
        feature_dir: where depth-0 activations are kept across runs (pretrained weights only).
        device_data: the images already on ``device`` (placed here when None).
        init_seed: seeds a randomly initialised backbone (``weights = none``) and the crop
            views every trial trains on (``regime``): the study's ``train_seed``, so a trial's
            own seed (a confirmation run's) changes its head and batch order, not its views.
    """

    def __init__(
        self,
        cache: ImageCache,
        weights: str,
        device: torch.device,
        holdout_fraction: float = 0.2,
        split_seed: int = 0,
        feature_dir: str | Path | None = None,
        device_data: DeviceData | None = None,
        init_seed: int = 0,
    ):
        self.cache, self.device = cache, device
        self.holdout_fraction, self.split_seed = holdout_fraction, split_seed
        self.data = device_data or DeviceData(cache, device)
        runtime.seed_everything(init_seed)
        model, self.weights = build_model(cache.num_classes, weights, 0)
        self._backbone_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
        #: The frozen weights' values, hashed once: part of every feature-cache key.
        self.weights_digest = weights_digest(self._backbone_state)
        self.views_seed = init_seed
        self.pool_rows, _ = holdout_indices(cache, holdout_fraction, split_seed)
        self.feature_dir = Path(feature_dir) if feature_dir and self.weights.pretrained else None
        self.features: FeatureStore | None = None

    def build(self, unfreeze_depth: int) -> TransferNet:
        """A fresh network for one trial: the shared backbone weights and a new, seeded head."""
        return build_on_backbone(self.cache.num_classes, self._backbone_state, unfreeze_depth)

    def splits(self, train_ratio: float) -> Splits:
        return make_splits(self.cache, train_ratio, self.holdout_fraction, self.split_seed)

    def regime(self, s: TrainSection) -> Views:
        """The views a trial with settings ``s`` trains on, whether or not their frozen
        activations are cached."""
        return Views.from_settings(s, seed=self.views_seed)

    def feature_cache(self, model: TransferNet, s: TrainSection) -> FeatureCache | None:
        """The frozen-activation cache of the trial's views for the model's depth (None with
        ``feature_memory_fraction`` 0, at depth 5, or when too large)."""
        regime = self.regime(s)
        if self.features is not None and self.features.regime != regime:
            self.features = None  # another regime's caches go before this one's are sized
            runtime.release_memory(self.device)
        if self.features is None:
            self.features = FeatureStore(
                f"{self.cache.fingerprint}|{self.weights_digest}", regime, 0.0, self.feature_dir
            )
        self.features.memory_fraction = s.feature_memory_fraction  # each trial's own (0 = no cache)
        return self.features.get(model, self.data, self.pool_rows, self.device)

    def run_trial(
        self,
        s: TrainSection,
        on_epoch_end: Callable[[EpochRecord], bool | None] | None = None,
        monitor: str = "val_acc",
        on_start: Callable[[Splits, dict], None] | None = None,
        splits: Splits | None = None,
    ) -> TrialOutcome:
        """Train one configuration on its ``train_ratio`` split and validate every epoch.

        Args:
            on_epoch_end: called after each epoch (``train.fit``); may stop or raise.
            monitor: the validation metric that names the best epoch (val_acc or val_f1).
            s: the settings; unset backbone-dependent keys (``backbone_lr_mult``) take their
                default for this runner's weights (``TrainSection.for_backbone``).
            on_start: called before training with the splits and the regime (``Views.describe``
                plus ``cache``: where the frozen activations are, ``features.placement_name``).
            splits: train on these instead (pool rows only; the refit trains on the whole pool
                and validates on nothing).
        """
        s = s.for_backbone(self.weights.pretrained)
        splits = splits if splits is not None else self.splits(s.train_ratio)
        runtime.seed_everything(s.train_seed)
        model = self.build(s.unfreeze_depth)
        regime = self.regime(s)
        features = self.feature_cache(model, s)
        if on_start is not None:
            on_start(splits, {**regime.describe(), "cache": placement_name(features)})
        started = time.perf_counter()
        try:
            result = fit(
                model, self.data, splits.train, splits.val, s, self.device, on_epoch_end, features, monitor, regime
            )
        finally:
            runtime.release_memory(self.device)
        if features is not None and self.features is not None:
            self.features.save(features)
        return TrialOutcome(model, splits, result, features, time.perf_counter() - started, s)
