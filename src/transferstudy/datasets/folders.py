"""Class-folder datasets: ``ROOT/train/<class>/*`` + ``ROOT/test/<class>/*``, or ``ROOT/<class>/*``.

The first layout is the one the original notebook used (the dataset's own test/ folder becomes
the fixed holdout); the second is a single pool from which a seeded holdout is drawn.
File listings are sorted, so class indices and sample order are stable across machines.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .base import DatasetError, DatasetIndex, Problem, Sample

log = logging.getLogger(__name__)

#: Operating-system litter that is skipped silently (hidden files are skipped too).
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(p.startswith(".") or p.lower() in IGNORED_NAMES for p in parts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p, folder))


def _files(class_dir: Path, problems: list[Problem]) -> list[Path]:
    """All visible files below a class folder, sorted; broken links become problems."""
    files = []
    for p in sorted(class_dir.rglob("*")):
        if not _visible(p, class_dir):
            continue
        if p.is_symlink() and not p.exists():
            problems.append(Problem(str(p), "broken symbolic link"))
        elif p.is_file():
            files.append(p)
    return files


def find_split_root(root: Path) -> Path:
    """The folder that holds train/ (and test/), looking through single-folder wrappers.

    Archives often unpack as ``car_data/car_data/train/...``, with loose files beside the
    wrapper (the Kaggle copy of Stanford Cars has anno_train.csv and names.csv there); a chain
    of folders that each hold exactly one visible sub-folder is followed down until train/
    appears. Without train/ the root itself is returned, so a pool is never looked through.
    """
    current = root
    for _ in range(4):
        if (current / "train").is_dir():
            return current
        subdirs = _class_dirs(current)
        if len(subdirs) != 1:
            break
        current = subdirs[0]
    return root


def scan_folders(root: str | Path) -> DatasetIndex:
    """Index a class-folder dataset.

    Raises:
        DatasetError: the root is missing or holds no class folders, or train/ and test/
            disagree on the classes (the message names them).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    base = find_split_root(root)
    problems: list[Problem] = []
    if (base / "train").is_dir():
        splits = {"train": base / "train"}
        if (base / "test").is_dir():
            splits["test"] = base / "test"
        per_split = {name: {d.name: d for d in _class_dirs(folder)} for name, folder in splits.items()}
        _check_same_classes(per_split, base)
        class_names = sorted(per_split["train"])
    else:
        per_split = {"pool": {d.name: d for d in _class_dirs(base)}}
        class_names = sorted(per_split["pool"])
    if not class_names:
        raise DatasetError(f"no class folders in {base} (expected {base}/<class>/* or {base}/train/<class>/*)")
    label_of = {name: i for i, name in enumerate(class_names)}
    samples = [
        Sample(path=f.absolute(), label=label_of[name], split=split)
        for split, classes in per_split.items()
        for name in class_names
        for f in _files(classes[name], problems)
    ]
    return DatasetIndex(root=base, class_names=class_names, samples=samples, problems=problems, source="folders")


def _check_same_classes(per_split: dict[str, dict[str, Path]], base: Path) -> None:
    if "test" not in per_split:
        return
    train, test = set(per_split["train"]), set(per_split["test"])
    only_train, only_test = sorted(train - test), sorted(test - train)
    if only_train or only_test:
        lines = [f"train/ and test/ in {base} have different classes:"]
        if only_test:
            lines.append(f"  only in test/: {', '.join(only_test)}")
        if only_train:
            lines.append(f"  only in train/: {', '.join(only_train)}")
        raise DatasetError("\n".join(lines))
