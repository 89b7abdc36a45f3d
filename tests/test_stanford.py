"""Stanford Cars devkit importer, on a tiny fake devkit written in the real .mat structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from transferstudy.datasets import DatasetError, read_manifest, scan_stanford_devkit
from transferstudy.datasets.open import open_dataset
from transferstudy.datasets.prepare import prepare
from transferstudy.images import decode_image

CLASS_NAMES = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "Škoda Octavia Combi 2011"]
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _car(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    """Blue background; the inclusive box is red with a green last column and last row."""
    x1, y1, x2, y2 = box
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = BLUE
    pixels[y1 : y2 + 1, x1 : x2 + 1] = RED
    pixels[y1 : y2 + 1, x2] = GREEN
    pixels[y2, x1 : x2 + 1] = GREEN
    Image.fromarray(pixels).save(path, format="PNG")  # lossless, so crops can be checked exactly


def _annotations(rows: list[tuple[int, int, int, int, int, str]]) -> np.ndarray:
    """A 1xN MATLAB struct array as in the devkit: every number a 1x1 uint8/uint16 matrix."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    out = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (x1, y1, x2, y2, cls, fname) in enumerate(rows):
        num = lambda v: np.array([[v]], dtype=np.uint8 if v < 256 else np.uint16)  # noqa: E731
        out[0, i] = (num(x1), num(y1), num(x2), num(y2), num(cls), np.array([fname]))
    return out


#: (split, fname, class 1-based, image size, inclusive box)
IMAGES = [
    ("train", "00001.jpg", 1, (40, 30), (5, 4, 14, 13)),
    ("train", "00002.jpg", 2, (40, 30), (20, 10, 29, 19)),
    ("train", "00003.jpg", 3, (256, 20), (246, 5, 255, 14)),  # x2 = 255: uint8 in the .mat
    ("train", "00004.jpg", 1, (30, 40), (0, 0, 9, 9)),
    ("test", "00001.jpg", 2, (40, 30), (1, 1, 10, 10)),
    ("test", "00002.jpg", 3, (40, 30), (30, 20, 39, 29)),
    ("test", "00003.jpg", 1, (40, 30), (10, 10, 19, 19)),
]


def write_devkit(root: Path, test_annos_in_devkit: bool = False) -> Path:
    """The release layout: devkit/*.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/."""
    (root / "devkit").mkdir(parents=True)
    names = np.empty((1, len(CLASS_NAMES)), dtype=object)
    names[0, :] = CLASS_NAMES
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    for split in ("train", "test"):
        (root / f"cars_{split}").mkdir()
        rows = []
        for s, fname, cls, size, box in IMAGES:
            if s == split:
                _car(root / f"cars_{split}" / fname, size, box)
                rows.append((*box, cls, fname))
        annos = (
            root / "devkit" / "cars_train_annos.mat"
            if split == "train"
            else (root / ("devkit" if test_annos_in_devkit else "") / "cars_test_annos_withlabels.mat")
        )
        scipy.io.savemat(annos, {"annotations": _annotations(rows)})
    return root


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    return write_devkit(tmp_path / "stanford_cars")


def test_class_names_labels_and_splits(devkit):
    index = scan_stanford_devkit(devkit)
    assert index.source == "stanford-devkit"
    assert index.class_names == CLASS_NAMES  # the devkit's order, not sorted
    got = [(s.split, s.path.name, s.label, s.bbox) for s in index.samples]
    want = [(split, fname, cls - 1, None) for split, fname, cls, _, _ in IMAGES]
    assert got == want
    assert index.problems == []
    assert index.has_test_split()


def test_matches_torchvision(devkit):
    from torchvision.datasets import StanfordCars

    index = scan_stanford_devkit(devkit.parent)  # torchvision's root, holding stanford_cars/
    for split in ("train", "test"):
        theirs = StanfordCars(str(devkit.parent), split=split)
        ours = [(str(s.path), s.label) for s in index.samples if s.split == split]
        assert ours == [(str(Path(p).absolute()), int(c)) for p, c in theirs._samples]
        assert index.class_names == theirs.classes


def test_bbox_crop_is_inclusive(devkit):
    index = scan_stanford_devkit(devkit, crop=True)
    boxes = {(s.split, s.path.name): s.bbox for s in index.samples}
    for split, fname, _, _, (x1, y1, x2, y2) in IMAGES:
        assert boxes[(split, fname)] == (x1, y1, x2 + 1, y2 + 1)
    assert boxes[("train", "00003.jpg")][2] == 256  # no uint8 overflow
    for s in index.samples:
        side = s.bbox[2] - s.bbox[0]
        crop = decode_image(s.path, side, "stretch", s.bbox)  # same size: no resampling
        assert (crop[0, 0] == RED).all(), s.path
        assert (crop[:-1, -1] == GREEN).all() and (crop[-1, :] == GREEN).all(), s.path  # x2, y2 included
        assert not (crop == BLUE).all(axis=-1).any(), s.path


def test_test_annotations_in_devkit_folder(tmp_path):
    root = write_devkit(tmp_path / "cars", test_annos_in_devkit=True)
    assert sum(s.split == "test" for s in scan_stanford_devkit(root).samples) == 3


def test_without_test_labels_uses_train_only(devkit, caplog):
    (devkit / "cars_test_annos_withlabels.mat").unlink()
    index = scan_stanford_devkit(devkit)
    assert {s.split for s in index.samples} == {"train"}
    assert "cars_test_annos_withlabels.mat" in caplog.text


def test_missing_and_unlisted_files_are_problems(devkit):
    (devkit / "cars_train" / "00002.jpg").unlink()
    (devkit / "cars_train" / "extra.jpg").write_bytes(b"x")
    (devkit / "cars_train" / ".DS_Store").write_bytes(b"\0")
    (devkit / "cars_test" / "Thumbs.db").write_bytes(b"\0")
    index = scan_stanford_devkit(devkit)
    reasons = {Path(p.path).name: p.reason for p in index.problems}
    assert reasons == {
        "00002.jpg": "listed in cars_train_annos.mat but missing",
        "extra.jpg": "not listed in cars_train_annos.mat (no label)",
    }
    assert all(s.path.name != "00002.jpg" or s.split == "test" for s in index.samples)


def test_symlinked_image_works_and_broken_link_is_reported(devkit, tmp_path):
    image = devkit / "cars_train" / "00001.jpg"
    elsewhere = tmp_path / "elsewhere.jpg"
    image.rename(elsewhere)
    image.symlink_to(elsewhere)
    (devkit / "cars_train" / "00002.jpg").unlink()
    (devkit / "cars_train" / "00002.jpg").symlink_to(tmp_path / "gone.jpg")
    index = scan_stanford_devkit(devkit, crop=True)
    assert any(s.path == image.absolute() for s in index.samples)
    assert [(Path(p.path).name, p.reason) for p in index.problems] == [("00002.jpg", "broken symbolic link")]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "devkit" / "cars_meta.mat").unlink(), "not a Stanford Cars devkit"),
        (lambda d: (d / "devkit" / "cars_train_annos.mat").unlink(), "cars_train_annos.mat not found"),
        (lambda d: (d / "devkit" / "cars_meta.mat").write_bytes(b"garbage"), "cannot be read as a MATLAB file"),
        (lambda d: scipy.io.savemat(d / "devkit" / "cars_meta.mat", {"names": [1]}), "no 'class_names' variable"),
        (
            lambda d: [p.unlink() for p in (d / "cars_train").iterdir()] and (d / "cars_train").rmdir(),
            "image folder not found",
        ),
    ],
)
def test_broken_devkit_gives_one_line_error(devkit, damage, message):
    damage(devkit)
    with pytest.raises(DatasetError, match=message) as err:
        scan_stanford_devkit(devkit)
    assert "\n" not in str(err.value)


def test_label_out_of_range_is_a_problem(devkit):
    rows = [(*box, cls, fname) for split, fname, cls, _, box in IMAGES if split == "train"]
    rows[0] = (*rows[0][:4], 9, rows[0][5])
    scipy.io.savemat(devkit / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(rows)})
    index = scan_stanford_devkit(devkit)
    assert [p.reason for p in index.problems] == ["class 9 outside 1..3 in cars_train_annos.mat"]


def test_open_dataset_detects_devkit(devkit):
    assert open_dataset(devkit).source == "stanford-devkit"
    assert open_dataset(devkit.parent).source == "stanford-devkit"
    assert all(s.bbox is None for s in open_dataset(devkit, crop="none").samples)
    assert all(s.bbox is not None for s in open_dataset(devkit, "stanford-devkit", crop="bbox").samples)


def test_prepare_devkit_with_crop_round_trips_through_the_manifest(devkit, tmp_path):
    result = prepare(devkit, tmp_path / "prepared", crop="bbox", show_progress=False)
    assert result.problems == []
    back = read_manifest(result.manifest_path)
    assert back.class_names == CLASS_NAMES
    assert back.samples == result.index.samples == scan_stanford_devkit(devkit, crop=True).samples
    assert back.root == devkit  # shared with the devkit, so decoded-image caches are too
    assert open_dataset(tmp_path / "prepared").samples == back.samples  # the study's entry point
    assert all(s.bbox is None for s in open_dataset(tmp_path / "prepared", crop="none").samples)
