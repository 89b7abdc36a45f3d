"""Splits: the fixed holdout, then nested, stratified, seeded train/validation splits of the pool.

Every labelled image is either in the fixed holdout (the dataset's own ``test/`` folder, or a
stratified, seeded ``holdout_fraction`` of the pool) or in the pool; a trial's ``train_ratio``
splits the pool per class. The cut only moves with the ratio, so splits are nested.

    >>> splits = make_splits(cache, train_ratio=0.8, holdout_fraction=0.2, split_seed=0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .images.cache import ImageCache


@dataclass(frozen=True)
class Splits:
    """Row indices into an ``ImageCache`` for each role (see DESIGN decision 2)."""

    train: np.ndarray
    val: np.ndarray
    holdout: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "holdout": len(self.holdout)}


def stratified_partition(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` per class into (first, rest) with ``fraction`` of each class first.

    Each class contributes ``round(fraction * n)`` images to the first part (at least one),
    so every class's share is within one image of the target. The order inside a class is a
    seeded permutation, so a larger fraction only moves the cut: parts are nested across
    fractions for the same seed.
    """
    first, rest = [], []
    for c in np.unique(labels[indices]):
        members = np.sort(indices[labels[indices] == c])
        members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        n_first = min(len(members), max(1, math.floor(fraction * len(members) + 0.5)))
        first.append(members[:n_first])
        rest.append(members[n_first:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(first), cat(rest)


def holdout_indices(cache: ImageCache, holdout_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, holdout): the dataset's test/ folder when it has one, else a seeded stratified draw."""
    is_test = cache.splits == "test"
    if is_test.any():
        return np.flatnonzero(~is_test), np.flatnonzero(is_test)
    everything = np.arange(len(cache))
    if holdout_fraction <= 0:
        return everything, np.zeros(0, dtype=np.int64)
    # Drawn with its own seed stream, independent of train_ratio, so it never moves.
    return stratified_partition(everything, cache.labels, 1.0 - holdout_fraction, seed=split_seed + 1_000_003)


def make_splits(cache: ImageCache, train_ratio: float, holdout_fraction: float, split_seed: int) -> Splits:
    """Fixed holdout, then ``train_ratio`` of the pool (per class) for training, the rest for validation."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    pool, holdout = holdout_indices(cache, holdout_fraction, split_seed)
    train, val = stratified_partition(pool, cache.labels, train_ratio, seed=split_seed)
    return Splits(train=train, val=val, holdout=holdout)


def holdout_protocol(cache: ImageCache, holdout_fraction: float) -> str:
    """One sentence that says where the holdout came from."""
    if (cache.splits == "test").any():
        return "the dataset's own test/ folder is the fixed holdout (published-benchmark protocol)"
    return f"a stratified, seeded {holdout_fraction:.0%} of the images is the fixed holdout"
