"""The study's dataset: opened once, decoded once (the decode-cache step), handed to every trial."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import StudyConfig
from ..datasets.base import DatasetIndex
from ..datasets.open import open_study_dataset
from ..images.cache import ImageCache, load_cache
from ..splits import holdout_protocol, make_splits

log = logging.getLogger(__name__)


@dataclass
class DecodedData:
    """A study's dataset, opened and decoded: what every trial and the holdout scoring read."""

    index: DatasetIndex
    cache: ImageCache

    def summary(self, cfg: StudyConfig) -> dict:
        cache = self.cache
        splits = make_splits(cache, cfg.train.train_ratio, cfg.data.holdout_fraction, cfg.data.split_seed)
        return {
            "path": str(self.index.root),
            "source": self.index.source,
            "num_classes": cache.num_classes,
            "class_names": cache.class_names,
            "num_images": len(cache),
            "pool_images": len(splits.train) + len(splits.val),
            "holdout_images": len(splits.holdout),
            "holdout_protocol": holdout_protocol(cache, cfg.data.holdout_fraction),
            "image_size": cache.image_size,
            "fingerprint": cache.fingerprint,
            "cache_dir": str(Path(cfg.data.cache_dir).resolve() / cache.fingerprint),
            "problems": [[p.path, p.reason] for p in cache.problems],
            "warnings": cache.warnings,
        }


def open_index(cfg: StudyConfig) -> DatasetIndex:
    """The study's dataset as an index (no image is decoded)."""
    return open_study_dataset(cfg.data.path, cfg.data.format, cfg.data.demo_per_class)


def decode_dataset(cfg: StudyConfig, index: DatasetIndex | None = None, show_progress: bool = True) -> DecodedData:
    """Validate and decode the dataset once (reusing the on-disk cache when unchanged).

    Args:
        index: the dataset already opened (``open_index``); opened here when None.
    """
    index = index or open_index(cfg)
    cache = load_cache(index, cfg.data.image_size, cfg.data.cache_dir, cfg.data.resize_mode, show_progress=show_progress)
    return DecodedData(index=index, cache=cache)
