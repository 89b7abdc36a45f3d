"""The embedded demo dataset: scikit-learn's handwritten digits written as a class-folder tree.

1,797 real 8x8 grayscale scans of the digits 0-9, written once as PNG files in the
``train/<class>/`` + ``test/<class>/`` layout (a stratified, seeded 80/20 split), so the demo
goes through exactly the same import, validation and caching path as a real dataset.

    python -c "from transferstudy.datasets.demo import write_digits; print(write_digits('studies/data/digits'))"
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

#: Share of each class written to test/ (the fixed holdout of the demo).
TEST_FRACTION = 0.2
DIGITS_SEED = 0
CLASS_NAMES = [f"digit_{d}" for d in range(10)]


def write_digits(dest: str | Path, per_class: int | None = None, seed: int = DIGITS_SEED) -> Path:
    """Write the digits dataset under ``dest`` once; later calls return at once.

    Args:
        per_class: keep only this many images per class (tests use a handful); None = all.
    """
    from sklearn.datasets import load_digits

    dest = Path(dest)
    marker = dest / "DATASET.json"
    info = {"source": "sklearn.datasets.load_digits", "per_class": per_class, "seed": seed, "test_fraction": TEST_FRACTION}
    if marker.is_file() and json.loads(marker.read_text()) == info:
        return dest
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASS_NAMES):
        rows = np.flatnonzero(digits.target == label)
        rows = rows[rng.permutation(len(rows))][:per_class]
        n_test = max(1, round(TEST_FRACTION * len(rows)))
        for i, row in enumerate(sorted(rows)):
            split = "test" if i < n_test else "train"
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(digits.images[row] * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
            Image.fromarray(255 - pixels, mode="L").save(folder / f"{row:04d}.png")
    marker.write_text(json.dumps(info))
    return dest
