"""The embedded demo dataset: scikit-learn's handwritten digits written as a class-folder tree.

1,797 real 8x8 grayscale scans of the digits 0-9, written once as PNG files in the
``train/<class>/`` + ``test/<class>/`` layout (a stratified, seeded 80/20 split), so the demo
goes through exactly the same import, validation and caching path as a real dataset.

    python -c "from transferstudy.datasets.demo import write_digits; print(write_digits('studies/data/digits'))"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

#: Share of each class written to test/ (the fixed holdout of the demo).
TEST_FRACTION = 0.2
DIGITS_SEED = 0
CLASS_NAMES = [f"digit_{d}" for d in range(10)]
MARKER = "DATASET.json"


def write_digits(dest: str | Path, per_class: int | None = None, seed: int = DIGITS_SEED) -> Path:
    """Write the digits dataset under ``dest`` once; later calls return at once.

    The files are written to a private folder and moved into place, so workers that start
    together never read a half-written dataset.

    Args:
        per_class: keep only this many images per class (tests use a handful); None = all.
    """
    dest = Path(dest)
    info = {
        "source": "sklearn.datasets.load_digits",
        "per_class": per_class,
        "seed": seed,
        "test_fraction": TEST_FRACTION,
    }
    if _is_complete(dest, info):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=dest.parent))
    _write_images(tmp, per_class, seed)
    (tmp / MARKER).write_text(json.dumps(info))
    if dest.exists() and not _is_complete(dest, info):
        shutil.rmtree(dest)  # an older or partial copy
    try:
        os.rename(tmp, dest)
    except OSError:  # another process put an identical copy in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_complete(dest: Path, info: dict) -> bool:
    marker = dest / MARKER
    try:
        return json.loads(marker.read_text()) == info
    except (OSError, ValueError):  # absent, or torn by an interrupted write: written again
        return False


def _write_images(dest: Path, per_class: int | None, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASS_NAMES):
        rows = np.flatnonzero(digits.target == label)
        rows = rows[rng.permutation(len(rows))][:per_class]
        n_test = max(1, round(TEST_FRACTION * len(rows)))
        for i, row in enumerate(sorted(rows)):
            folder = dest / ("test" if i < n_test else "train") / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(digits.images[row] * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
            Image.fromarray(255 - pixels, mode="L").save(folder / f"{row:04d}.png")
