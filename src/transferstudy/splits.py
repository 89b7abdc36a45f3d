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

from .datasets.base import absent_from_holdout
from .images.cache import ImageCache


@dataclass(frozen=True)
class Splits:
    """Row indices into an ``ImageCache`` for each role (README, "Design decisions" 2). ``holdout``
    is every holdout row; what gets scored leaves out copies of pool images (``HoldoutRows``)."""

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


@dataclass(frozen=True)
class HoldoutRows:
    """The pool and the fixed holdout less its copies of pool images, as rows of an ``ImageCache``.

    A holdout image whose file holds the same bytes as a pool image (a test/ file copied from
    train/, or a drawn holdout image with a twin in the pool) tests nothing the trials did not
    train on, so it is never scored; it stays where it is, only its score is left out.

    Attributes:
        pool: every non-holdout row (what the trials split into train and validation).
        scored: the holdout rows that are scored.
        copies: the holdout rows left out; ``copy_of`` holds, at the same place, a pool row with the same bytes.
    """

    pool: np.ndarray
    scored: np.ndarray
    copies: np.ndarray
    copy_of: np.ndarray

    def copy_files(self, paths: list[str], limit: int) -> list[list[str]]:
        """[holdout file, pool file it copies] of the first ``limit`` copies."""
        return [[paths[i], paths[j]] for i, j in zip(self.copies[:limit], self.copy_of[:limit])]


def exclude_copies(pool: np.ndarray, holdout: np.ndarray, copies: dict[int, list[int]]) -> HoldoutRows:
    """Leave the copies out of the holdout.

    Args:
        copies: position in ``holdout`` -> positions in ``pool`` of files with the same bytes
            (``datasets.hashes.find_copies``).
    """
    left_out = np.array(sorted(copies), dtype=np.int64)
    keep = np.ones(len(holdout), dtype=bool)
    keep[left_out] = False
    copy_of = np.array([pool[copies[i][0]] for i in left_out], dtype=np.int64)
    return HoldoutRows(pool=pool, scored=holdout[keep], copies=holdout[left_out], copy_of=copy_of)


def make_splits(cache: ImageCache, train_ratio: float, holdout_fraction: float, split_seed: int) -> Splits:
    """Fixed holdout, then ``train_ratio`` of the pool (per class) for training, the rest for validation."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    pool, holdout = holdout_indices(cache, holdout_fraction, split_seed)
    train, val = stratified_partition(pool, cache.labels, train_ratio, seed=split_seed)
    return Splits(train=train, val=val, holdout=holdout)


def common_validation(cache: ImageCache, largest_ratio: float, holdout_fraction: float, split_seed: int) -> np.ndarray:
    """The validation rows every trial shares: the validation split of the largest train_ratio.

    Splits are nested (``stratified_partition``: a larger ratio only moves each class's cut), so
    the validation split at ``largest_ratio`` lies inside the validation split of every ratio up
    to it and no trial at such a ratio trains on it. Scored on these rows, trials with different
    ratios are judged on the same images (DESIGN decision 7).
    """
    return make_splits(cache, largest_ratio, holdout_fraction, split_seed).val


def holdout_protocol(cache: ImageCache, holdout_fraction: float) -> str:
    """One sentence that says where the holdout came from."""
    if (cache.splits == "test").any():
        return "the dataset's own test/ folder is the fixed holdout (published-benchmark protocol)"
    return f"a stratified, seeded {holdout_fraction:.0%} of the images is the fixed holdout"


def holdout_warnings(cache: ImageCache, rows: HoldoutRows, holdout_fraction: float) -> list[str]:
    """Name the classes the scored holdout has no image of, where the decode's check (which names
    classes without a test/ image) cannot see them.

    A drawn holdout gives a class of ``n`` images ``n - round((1 - f) n)`` of them, but never its
    last one (``stratified_partition`` keeps at least one of each class in the pool): a class with
    ``n * f <= 0.5`` (2 images or fewer at f = 0.2) is absent from it. In either protocol, a class
    whose every holdout image copies a pool image is not scored (``HoldoutRows``).
    """
    drawn = not (cache.splits == "test").any()
    if drawn and holdout_fraction <= 0:
        return []  # no holdout at all, which the report says on its own
    held = np.bincount(cache.labels[np.concatenate([rows.scored, rows.copies])], minlength=cache.num_classes)
    scored = np.bincount(cache.labels[rows.scored], minlength=cache.num_classes)
    too_small = absent_from_holdout(cache.class_names, held == 0, f"too few images for a {holdout_fraction:.0%} draw")
    copied = absent_from_holdout(
        cache.class_names, (held > 0) & (scored == 0), "every holdout image copies a training image"
    )
    return (too_small if drawn else []) + copied
