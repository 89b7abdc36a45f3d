"""The common shape every dataset importer returns: labelled files plus what went wrong."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Split tags a sample may carry. "pool" = no predefined split (holdout is drawn from it).
SPLITS = ("train", "test", "pool")
#: Fewest classes with usable training images a study accepts: with one, every prediction is right.
MIN_CLASSES = 2


class DatasetError(ValueError):
    """A dataset cannot be used as given; the message names the files or classes at fault."""


@dataclass(frozen=True)
class Problem:
    """One file that was skipped, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Sample:
    """One labelled image file.

    Attributes:
        path: absolute path of the image file.
        label: class index into ``DatasetIndex.class_names``.
        split: "train", "test" (the fixed holdout) or "pool" (no predefined split).
        bbox: optional crop box (left, top, right, bottom) in pixels, applied before resizing.
    """

    path: Path
    label: int
    split: str
    bbox: tuple[int, int, int, int] | None = None


@dataclass
class DatasetIndex:
    """Everything an importer found: class names in label order (sorted for class folders,
    the devkit's order for Stanford Cars), sorted samples, skipped files."""

    root: Path
    class_names: list[str]
    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    source: str = "folders"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_test_split(self) -> bool:
        return any(s.split == "test" for s in self.samples)


@dataclass(frozen=True)
class ClassCounts:
    """Usable images per class, and the one rule on them that both the import (``prepare``) and
    the decode (``load_cache``) apply: what stops a study, and what only weakens its scores.

    Attributes:
        class_names: in label order.
        train: per class, usable training images (``train/`` or pool).
        test: per class, usable ``test/`` images; None when the dataset has no test/ folder.
    """

    class_names: list[str]
    train: np.ndarray
    test: np.ndarray | None

    @classmethod
    def of(cls, class_names: Sequence[str], labels: Sequence[int], splits: Sequence[str]) -> ClassCounts:
        """Counts of the usable images with these labels and split tags."""
        labels, is_test = np.asarray(labels, dtype=np.int64), np.asarray(splits) == "test"
        n = len(class_names)
        test = np.bincount(labels[is_test], minlength=n) if is_test.any() else None
        return cls(list(class_names), np.bincount(labels[~is_test], minlength=n), test)

    def names(self, mask: np.ndarray) -> list[str]:
        return [self.class_names[c] for c in np.flatnonzero(mask)]

    def error(self) -> str | None:
        """Why no study can run on these images, in one line; None when one can."""
        empty = self.names(self.train == 0)
        if empty:
            return (
                f"{len(empty)} class(es) have no usable training image: {', '.join(empty)} "
                "(empty folders, or every file was skipped)"
            )
        if len(self.class_names) < MIN_CLASSES:
            found = f"only 1 class ({self.class_names[0]})" if self.class_names else "no class"
            return f"{found} has usable training images; a study needs at least {MIN_CLASSES} classes to tell apart"
        return None

    def warnings(self) -> list[str]:
        """Classes that can be trained but not fully scored."""
        notes = []
        single = self.names(self.train == 1)
        if single:
            notes.append(f"classes with a single training image (absent from validation): {', '.join(single)}")
        if self.test is not None:
            notes += absent_from_holdout(self.class_names, self.test == 0, "no usable test/ image")
        return notes


def absent_from_holdout(class_names: list[str], absent: np.ndarray, why: str) -> list[str]:
    """The warning that names the classes the scored holdout has no image of (``absent``, a mask
    over ``class_names``), and why; none when every class is there."""
    names = [class_names[c] for c in np.flatnonzero(absent)]
    return [f"classes absent from the holdout ({why}): {', '.join(names)}"] if names else []
