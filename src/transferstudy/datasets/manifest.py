"""Manifests: one CSV row per usable image, as written by ``prepare`` and read back by studies.

Columns (UTF-8, header row):

    path       image file; absolute, or relative to the manifest's folder
    class      class name
    label      class index (0-based); optional, else the sorted class names are numbered
    split      train | test | pool; optional, default pool
    width, height   image size in pixels, after EXIF orientation (empty when unknown)
    bbox       crop box "left top right bottom" applied before resizing (empty = whole image)
    sha256     hash of the file's bytes
    size, mtime_ns  the file's size and modification time when it was hashed

Only ``path`` and ``class`` are required, so a hand-written manifest works. ``prepare`` writes
the files it left out, and why, beside the manifest as ``problems.csv`` (columns file, problem;
see ``read_problems``); ``read_manifest`` returns them as the index's problems.

    >>> index = read_manifest("studies/data/cars/manifest.csv")
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .base import SPLITS, DatasetError, DatasetIndex, Problem, Sample

MANIFEST_NAME = "manifest.csv"
PROBLEMS_NAME = "problems.csv"
COLUMNS = ("path", "class", "label", "split", "width", "height", "bbox", "sha256", "size", "mtime_ns")
#: Per-file facts ``write_manifest`` takes from its ``info`` argument (the rest come from the samples).
INFO_COLUMNS = ("width", "height", "sha256", "size", "mtime_ns")


def format_bbox(bbox: tuple[int, int, int, int] | None) -> str:
    return "" if bbox is None else " ".join(str(int(v)) for v in bbox)


def parse_bbox(text: str) -> tuple[int, int, int, int] | None:
    """``"l t r b"`` (commas and brackets tolerated) -> a 4-tuple; empty -> None.

    Raises:
        ValueError: not four integers.
    """
    parts = text.replace(",", " ").strip(" []()").split()
    if not parts:
        return None
    if len(parts) != 4:
        raise ValueError(f"bbox needs 4 integers, got {text!r}")
    left, top, right, bottom = (int(float(p)) for p in parts)
    return left, top, right, bottom


def write_manifest(path: str | Path, index: DatasetIndex, info: dict[str, dict] | None = None) -> Path:
    """Write one row per sample of ``index``; ``info`` maps ``str(sample.path)`` to INFO_COLUMNS values.

    The file is replaced atomically, so a reader never sees half a manifest.
    """
    info = info or {}
    rows = []
    for s in index.samples:
        facts = info.get(str(s.path), {})
        rows.append(
            {
                "path": str(s.path),
                "class": index.class_names[s.label],
                "label": s.label,
                "split": s.split,
                **{k: facts.get(k, "") for k in ("width", "height")},
                "bbox": format_bbox(s.bbox),
                **{k: facts.get(k, "") for k in ("sha256", "size", "mtime_ns")},
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(tmp, index=False, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest_frame(path: str | Path) -> pd.DataFrame:
    """The manifest as strings (class names such as "2012" or "NA" stay text), paths made absolute.

    Raises:
        DatasetError: the file is missing, unreadable, or lacks the path or class column.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot be read as CSV ({exc})".replace("\n", " ")) from None
    missing = [c for c in ("path", "class") if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (need at least path and class)")
    frame["path"] = [str(path.parent / p) if not os.path.isabs(p) else p for p in frame["path"]]
    return frame


def _class_names(frame: pd.DataFrame, where: Path) -> list[str]:
    """Class names in label order, checking that class and label agree."""
    if "label" not in frame.columns or (frame["label"] == "").all():
        return sorted(set(frame["class"]))
    try:
        labels = frame["label"].astype(int)
    except ValueError:
        raise DatasetError(f"{where}: the label column must hold integers") from None
    pairs = set(zip(labels, frame["class"]))
    names = dict(pairs)
    if len(names) != len(pairs) or len(set(names.values())) != len(names):
        raise DatasetError(f"{where}: class and label columns disagree (each class needs one label)")
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{where}: labels must be 0..{len(names) - 1}, got {sorted(names)[:5]}...")
    return [names[i] for i in range(len(names))]


def read_problems(path: str | Path) -> list[Problem]:
    """Rows of a ``problems.csv`` (columns file, problem); none when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise DatasetError(
            f"{path} is not a readable problems list ({type(exc).__name__}); prepare the dataset again"
        ) from None
    return [Problem(f, p) for f, p in zip(frame.get("file", []), frame.get("problem", []))]


def read_manifest(path: str | Path) -> DatasetIndex:
    """Read a manifest (a ``manifest.csv`` or a folder holding one) into a ``DatasetIndex``.

    The index root is the deepest folder holding every listed file (the dataset's own root
    for a manifest written by ``prepare``), so decoded-image caches are shared with it.

    Raises:
        DatasetError: the manifest is missing, empty or inconsistent (one line naming the fault).
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        path = path / MANIFEST_NAME
    frame = read_manifest_frame(path)
    if frame.empty:
        raise DatasetError(f"{path}: no rows")
    splits = frame["split"] if "split" in frame.columns else pd.Series(["pool"] * len(frame))
    splits = splits.replace("", "pool")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DatasetError(f"{path}: unknown split(s) {', '.join(unknown)} (expected {', '.join(SPLITS)})")
    class_names = _class_names(frame, path)
    label_of = {name: i for i, name in enumerate(class_names)}
    boxes = frame["bbox"] if "bbox" in frame.columns else [""] * len(frame)
    samples = []
    for row, (file, name, split, box) in enumerate(zip(frame["path"], frame["class"], splits, boxes), start=2):
        try:
            bbox = parse_bbox(box)
        except ValueError as exc:
            raise DatasetError(f"{path}, line {row}: {exc}") from None
        samples.append(Sample(path=Path(file), label=label_of[name], split=split, bbox=bbox))
    try:
        root = Path(os.path.commonpath([str(s.path.parent) for s in samples]))
    except ValueError:  # files on different drives
        root = path.parent
    return DatasetIndex(
        root=root,
        class_names=class_names,
        samples=samples,
        # What prepare left out travels with the dataset into every study's report header.
        problems=read_problems(path.parent / PROBLEMS_NAME),
        source="manifest",
    )


def write_problems(path: str | Path, problems: list[Problem]) -> Path:
    """Write ``problems.csv`` (columns file, problem); a header alone when nothing went wrong."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame = pd.DataFrame([(p.path, p.reason) for p in problems], columns=["file", "problem"])
    frame.to_csv(tmp, index=False, encoding="utf-8")
    os.replace(tmp, path)
    return path
