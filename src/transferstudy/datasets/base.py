"""The common shape every dataset importer returns: labelled files plus what went wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Split tags a sample may carry. "pool" = no predefined split (holdout is drawn from it).
SPLITS = ("train", "test", "pool")


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
