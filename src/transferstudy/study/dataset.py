"""The study's dataset: opened once, decoded once (the decode-cache step), handed to every trial."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..config import StudyConfig
from ..datasets.base import DatasetIndex
from ..datasets.hashes import find_copies
from ..datasets.open import open_study_dataset
from ..images.cache import ImageCache, load_cache
from ..splits import HoldoutRows, exclude_copies, holdout_indices, holdout_protocol, holdout_warnings
from . import attrs

log = logging.getLogger(__name__)

#: Holdout copies of pool images named in the dataset summary and the log (all are counted).
MAX_COPY_FILES = 50


@dataclass
class DecodedData:
    """A study's dataset, opened and decoded: what every trial and the holdout scoring read."""

    index: DatasetIndex
    cache: ImageCache
    show_progress: bool = True
    _holdout: dict[tuple, HoldoutRows] = field(default_factory=dict, repr=False)

    def holdout_rows(self, cfg: StudyConfig) -> HoldoutRows:
        """The pool and the holdout rows to score: the one place that leaves out holdout images
        whose bytes a pool image shares. Whatever scores the holdout scores ``.scored`` only.

        Content hashes go through the hash cache in ``[data] cache_dir`` (``datasets.hashes``), and
        only files whose byte count the other side shares are hashed: a second run reads no file.
        """
        key = (cfg.data.holdout_fraction, cfg.data.split_seed, str(cfg.data.cache_dir))
        if key not in self._holdout:
            pool, holdout = holdout_indices(self.cache, cfg.data.holdout_fraction, cfg.data.split_seed)
            paths = self.cache.paths
            held, pooled = [paths[i] for i in holdout], [paths[i] for i in pool]
            copies = find_copies(held, pooled, cfg.data.cache_dir, self.show_progress)
            rows = exclude_copies(pool, holdout, copies)
            if len(rows.copies):
                listed = "\n".join(f"  {h}  (copy of {p})" for h, p in rows.copy_files(paths, MAX_COPY_FILES))
                log.warning(
                    "%d of %d holdout images are byte copies of training images and are not scored:\n%s",
                    len(rows.copies),
                    len(holdout),
                    listed,
                )
            self._holdout[key] = rows
        return self._holdout[key]

    def summary(self, cfg: StudyConfig) -> dict:
        cache = self.cache
        rows = self.holdout_rows(cfg)
        return {
            "path": str(self.index.root),
            "source": self.index.source,
            "num_classes": cache.num_classes,
            "class_names": cache.class_names,
            "num_images": len(cache),
            "pool_images": len(rows.pool),
            "holdout_images": len(rows.scored) + len(rows.copies),
            attrs.HOLDOUT_SCORED: len(rows.scored),
            attrs.HOLDOUT_COPIES: len(rows.copies),
            attrs.HOLDOUT_COPY_FILES: rows.copy_files(cache.paths, MAX_COPY_FILES),
            "holdout_protocol": holdout_protocol(cache, cfg.data.holdout_fraction),
            "image_size": cache.image_size,
            "fingerprint": cache.fingerprint,
            "cache_dir": str(Path(cfg.data.cache_dir).resolve() / cache.fingerprint),
            "problems": [[p.path, p.reason] for p in cache.problems],
            "warnings": cache.warnings + holdout_warnings(cache, rows, cfg.data.holdout_fraction),
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
    cache = load_cache(
        index, cfg.data.image_size, cfg.data.cache_dir, cfg.data.resize_mode, show_progress=show_progress
    )
    return DecodedData(index=index, cache=cache, show_progress=show_progress)
