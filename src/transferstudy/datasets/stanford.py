"""The original Stanford Cars release, laid out as torchvision's ``StanfordCars`` reads it.

    ROOT/devkit/cars_meta.mat               class_names: 196 names, in label order
    ROOT/devkit/cars_train_annos.mat        annotations: bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
    ROOT/cars_test_annos_withlabels.mat     the same for the test images (also accepted in devkit/)
    ROOT/cars_train/00001.jpg ...
    ROOT/cars_test/00001.jpg ...

ROOT may also be torchvision's root, the folder that holds ``stanford_cars/``. Labels in the
.mat files count from 1 and become 0-based; class names keep the devkit's order, so label
indices match torchvision and published results. Bounding boxes are inclusive pixel
coordinates; with ``crop`` each sample gets the crop box ``(x1, y1, x2 + 1, y2 + 1)``.

    >>> index = scan_stanford_devkit("data/stanford_cars", crop=True)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .base import DatasetError, DatasetIndex, Problem, Sample
from .folders import IGNORED_NAMES

log = logging.getLogger(__name__)

META_FILE = Path("devkit") / "cars_meta.mat"
TRAIN_ANNOTATIONS = Path("devkit") / "cars_train_annos.mat"
#: Where the labelled test annotations may be; the first one that exists is used.
TEST_ANNOTATIONS = (Path("cars_test_annos_withlabels.mat"), Path("devkit") / "cars_test_annos_withlabels.mat")
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def find_devkit_root(path: str | Path) -> Path | None:
    """The folder that holds ``devkit/cars_meta.mat``: ``path`` itself or ``path/stanford_cars``."""
    path = Path(path)
    for candidate in (path, path / "stanford_cars"):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def _loadmat(path: Path, key: str) -> np.ndarray:
    import scipy.io

    try:
        content = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises several types for damaged or non-MATLAB files
        raise DatasetError(f"{path}: cannot be read as a MATLAB file ({type(exc).__name__}: {exc})") from None
    if key not in content:
        raise DatasetError(f"{path}: no '{key}' variable (not a Stanford Cars devkit file)")
    return np.atleast_1d(content[key])  # squeeze_me turns a single entry into a 0-d array


def read_class_names(meta_path: Path) -> list[str]:
    """Class names from ``cars_meta.mat``, in label order.

    Raises:
        DatasetError: the file is unreadable, empty, or names a class twice.
    """
    names = [str(n).strip() for n in _loadmat(meta_path, "class_names").tolist()]
    if not names:
        raise DatasetError(f"{meta_path}: no class names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"{meta_path}: class names listed twice: {', '.join(repeated)}")
    return names


def _read_annotations(path: Path) -> np.ndarray:
    annotations = _loadmat(path, "annotations")
    missing = [f for f in ANNOTATION_FIELDS if annotations.dtype.names is None or f not in annotations.dtype.names]
    if missing:
        raise DatasetError(f"{path}: annotations lack the field(s) {', '.join(missing)}")
    return annotations


def _split_samples(
    annotations_path: Path, images_dir: Path, split: str, num_classes: int, crop: bool, problems: list[Problem]
) -> list[Sample]:
    """Samples of one split; files that are listed but unusable become problems."""
    if not images_dir.is_dir():
        raise DatasetError(f"image folder not found: {images_dir} (listed by {annotations_path.name})")
    samples, listed = [], set()
    for a in _read_annotations(annotations_path):
        path = (images_dir / str(a["fname"]).strip()).absolute()
        listed.add(path.name)
        label = int(a["class"]) - 1
        if not 0 <= label < num_classes:
            problems.append(
                Problem(str(path), f"class {int(a['class'])} outside 1..{num_classes} in {annotations_path.name}")
            )
        elif path.is_symlink() and not path.exists():
            problems.append(Problem(str(path), "broken symbolic link"))
        elif not path.is_file():
            problems.append(Problem(str(path), f"listed in {annotations_path.name} but missing"))
        else:
            # int() first: the .mat stores uint8/uint16, where x2 + 1 can overflow.
            box = (int(a["bbox_x1"]), int(a["bbox_y1"]), int(a["bbox_x2"]) + 1, int(a["bbox_y2"]) + 1)
            samples.append(Sample(path=path, label=label, split=split, bbox=box if crop else None))
    for p in sorted(images_dir.iterdir()):
        if p.name not in listed and not p.name.startswith(".") and p.name.lower() not in IGNORED_NAMES:
            problems.append(Problem(str(p.absolute()), f"not listed in {annotations_path.name} (no label)"))
    return sorted(samples, key=lambda s: s.path)


def scan_stanford_devkit(root: str | Path, crop: bool = False) -> DatasetIndex:
    """Index the Stanford Cars devkit layout: cars_train/ is "train", cars_test/ is "test".

    Args:
        root: the folder holding ``devkit/`` (or torchvision's root holding ``stanford_cars/``).
        crop: give every sample its annotated bounding box, so decoding crops to the car.

    Raises:
        DatasetError: the devkit files are missing or unreadable (the message names the file).
    """
    root = Path(root).expanduser().resolve()
    base = find_devkit_root(root)
    if base is None:
        raise DatasetError(f"not a Stanford Cars devkit: {root / META_FILE} not found")
    class_names = read_class_names(base / META_FILE)
    if not (base / TRAIN_ANNOTATIONS).is_file():
        raise DatasetError(f"Stanford Cars devkit incomplete: {base / TRAIN_ANNOTATIONS} not found")
    problems: list[Problem] = []
    samples = _split_samples(base / TRAIN_ANNOTATIONS, base / "cars_train", "train", len(class_names), crop, problems)
    test_annotations = next((base / p for p in TEST_ANNOTATIONS if (base / p).is_file()), None)
    if test_annotations is None:
        log.warning("%s: no cars_test_annos_withlabels.mat, so the test images have no labels and are not used", base)
    else:
        samples += _split_samples(test_annotations, base / "cars_test", "test", len(class_names), crop, problems)
    problems.sort(key=lambda p: p.path)
    return DatasetIndex(
        root=base, class_names=class_names, samples=samples, problems=problems, source="stanford-devkit"
    )
