"""Open any supported dataset: format detection and the one entry point for reading a dataset.

``open_dataset`` reads class folders, a Stanford Cars devkit or a manifest into a
``DatasetIndex``; ``open_study_dataset`` does the same for a study's ``[data]`` table (the
embedded digits for ``path = "demo"``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import FORMATS
from .base import DatasetError, DatasetIndex
from .folders import scan_folders
from .manifest import MANIFEST_NAME, read_manifest
from .stanford import find_devkit_root, scan_stanford_devkit

#: none = whole images; bbox = crop to annotated boxes. None (default) = what the source says:
#: a manifest's recorded boxes, no crop for folders and devkits.
CROPS = ("none", "bbox")
#: Where the demo digits are written.
DEMO_DIR = Path("studies/data")


def detect_format(path: Path) -> str:
    """ "manifest" for a .csv file or a folder holding manifest.csv, "stanford-devkit" for a
    folder with devkit/cars_meta.mat (or stanford_cars/devkit/...), else "folders"."""
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"not a dataset: {path} is a file (expected a folder or a manifest .csv)")
        return "manifest"
    if (path / MANIFEST_NAME).is_file():
        return "manifest"
    if find_devkit_root(path) is not None:
        return "stanford-devkit"
    return "folders"


def open_dataset(path: str | Path, format: str = "auto", crop: str | None = None) -> DatasetIndex:
    """Read a dataset into a ``DatasetIndex``, whatever its format.

    Args:
        path: a class-folder dataset, a Stanford Cars devkit folder, a manifest.csv or a
            folder holding one.
        format: one of FORMATS; "auto" detects it (see ``detect_format``).
        crop: one of CROPS, or None for the source's own choice (see CROPS).

    Raises:
        DatasetError: the path is missing, the format or crop is unknown or does not fit the
            data, or the importer rejects the data (one line naming the fault).
    """
    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r} (expected one of {', '.join(FORMATS)})")
    if crop is not None and crop not in CROPS:
        raise DatasetError(f"unknown crop {crop!r} (expected one of {', '.join(CROPS)})")
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt != "manifest" and not path.is_dir():
        raise DatasetError(f"a {fmt} dataset is a folder, but {path} is a file")
    if fmt == "manifest":
        return _crop_manifest(read_manifest(path), crop, path)
    if fmt == "stanford-devkit":
        return scan_stanford_devkit(path, crop=crop == "bbox")
    if crop == "bbox":
        raise DatasetError(f"crop 'bbox' needs bounding boxes, and the class folders in {path} have none")
    return scan_folders(path)


def _crop_manifest(index: DatasetIndex, crop: str | None, path: Path) -> DatasetIndex:
    if crop == "none":
        index.samples = [replace(s, bbox=None) for s in index.samples]
    elif crop == "bbox" and not any(s.bbox for s in index.samples):
        raise DatasetError(
            f"crop 'bbox' asked for, but the manifest {path} has no bounding boxes (prepare it with crop bbox)"
        )
    return index


def open_study_dataset(path: str, format: str = "auto", demo_per_class: int = 0) -> DatasetIndex:
    """A study's dataset as an index: the embedded digits for ``demo``, else ``open_dataset``."""
    if path == "demo":
        from .demo import write_digits

        per_class = demo_per_class or None
        folder = DEMO_DIR / (f"digits-{per_class}" if per_class else "digits")
        return open_dataset(write_digits(folder, per_class=per_class), "folders")
    return open_dataset(path, format)
