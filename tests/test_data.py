"""data.py and datasets/folders.py: scanning, decoding, the decode-once cache, splits, batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, write_class_folders
from PIL import Image

from transferstudy import runtime
from transferstudy.datasets import DatasetError, scan_folders
from transferstudy.datasets.base import ClassCounts
from transferstudy.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    DeviceData,
    ImageCache,
    ImageProblem,
    augment_batch,
    decode_image,
    load_cache,
    normalize,
)
from transferstudy.splits import exclude_copies, holdout_indices, holdout_warnings, make_splits, stratified_partition

# --------------------------------------------------------------------------- scanning


def test_scan_split_layout_sorted_and_labelled(split_dataset):
    index = scan_folders(split_dataset)
    assert index.class_names == ["class_0", "class_1", "class_2"]
    assert len(index.samples) == 3 * (6 + 2)
    assert index.has_test_split()
    for s in index.samples:
        assert s.path.is_absolute()
        assert s.path.parent.name == index.class_names[s.label]
        assert s.path.parent.parent.name == s.split
    assert [s.path for s in index.samples] == sorted(
        (s.path for s in index.samples), key=lambda p: (p.parent.parent.name != "train", p)
    )


def test_scan_pool_layout(pool_dataset):
    index = scan_folders(pool_dataset)
    assert index.class_names == ["class_0", "class_1", "class_2"]
    assert {s.split for s in index.samples} == {"pool"}
    assert not index.has_test_split()


def test_scan_looks_through_single_folder_wrappers(tmp_path):
    write_class_folders(tmp_path / "car_data" / "car_data", num_classes=2, per_class=2, test_per_class=1)
    index = scan_folders(tmp_path / "car_data")
    assert index.root == (tmp_path / "car_data" / "car_data").resolve()
    assert index.has_test_split()


@pytest.mark.parametrize("where", ["train", "test"])
def test_class_in_only_one_split_names_the_class(split_dataset, where):
    extra = split_dataset / where / "lonely_class"
    extra.mkdir()
    make_image(0, 16, np.random.default_rng(0)).save(extra / "a.png")
    with pytest.raises(DatasetError, match="lonely_class") as info:
        scan_folders(split_dataset)
    assert f"only in {where}/" in str(info.value)


def test_missing_root_and_no_classes(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        scan_folders(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        scan_folders(tmp_path / "empty")


# --------------------------------------------------------------------------- bad files


def _write_bad_files(folder: Path) -> dict[str, str]:
    """Write one file of each broken kind; returns file name -> expected word in the reason."""
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not a JPEG\n")
    big = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return {"zero.jpg": "empty", "notes.jpg": "not an image", "truncated.jpg": "truncated"}


def test_bad_files_are_listed_and_skipped(split_dataset, cache_dir):
    folder = split_dataset / "train" / "class_1"
    expected = _write_bad_files(folder)
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / "Thumbs.db").write_bytes(b"\x00\x01junk")
    (folder / ".hidden").mkdir()
    make_image(1, 16, np.random.default_rng(2)).save(folder / ".hidden" / "x.png")
    os.symlink(folder / "missing_target.png", folder / "dangling.png")

    cache = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)

    assert len(cache) == 3 * (6 + 2)  # only the good images
    reasons = {Path(p.path).name: p.reason for p in cache.problems}
    assert set(reasons) == set(expected) | {"dangling.png"}
    for name, word in expected.items():
        assert word in reasons[name], reasons[name]
    assert "symbolic link" in reasons["dangling.png"]
    for p in cache.problems:
        assert Path(p.path).is_absolute() and Path(p.path).parent == folder.resolve()
    assert not any(Path(p).name in {".DS_Store", "Thumbs.db", "x.png"} for p in cache.paths)
    assert cache.images.shape == (len(cache), 16, 16, 3) and cache.images.dtype == np.uint8


def test_problems_survive_a_cache_reuse(split_dataset, cache_dir):
    _write_bad_files(split_dataset / "test" / "class_0")
    first = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    again = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    assert again.decoded == 0
    assert again.problems == first.problems and len(again.problems) == 3


@pytest.mark.parametrize("layout", ["split", "pool"])
def test_class_with_only_bad_files_names_it(tmp_path, cache_dir, layout):
    root = write_class_folders(
        tmp_path / "d", num_classes=3, per_class=3, test_per_class=1 if layout == "split" else None
    )
    folder = root / "train" / "class_2" if layout == "split" else root / "class_2"
    for f in folder.iterdir():
        f.unlink()
    _write_bad_files(folder)
    with pytest.raises(DatasetError, match="class_2") as info:
        load_cache(scan_folders(root), 16, cache_dir, workers=1, show_progress=False)
    assert "class_0" not in str(info.value)


def test_empty_class_folder_names_it(split_dataset, cache_dir):
    (split_dataset / "train" / "class_3").mkdir()
    (split_dataset / "train" / "class_3" / ".DS_Store").write_bytes(b"junk")
    (split_dataset / "test" / "class_3").mkdir()
    make_image(0, 16, np.random.default_rng(0)).save(split_dataset / "test" / "class_3" / "t.png")
    with pytest.raises(DatasetError, match="class_3"):
        load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)


@pytest.mark.parametrize("layout", ["split", "pool"])
def test_a_single_class_is_refused_in_one_line(tmp_path, cache_dir, layout):
    # One class would make every prediction right: a study of it measures nothing.
    root = write_class_folders(
        tmp_path / "d", num_classes=1, per_class=4, test_per_class=2 if layout == "split" else None
    )
    with pytest.raises(DatasetError) as info:
        load_cache(scan_folders(root), 16, cache_dir, workers=1, show_progress=False)
    assert (
        str(info.value)
        == "only 1 class (class_0) has usable training images; a study needs at least 2 classes to tell apart"
    )
    assert not list(cache_dir.glob("*/meta.json"))  # refused before a cache is written


def test_class_rule_verdicts():
    names = ["a", "b", "c"]
    ok = ClassCounts.of(names, [0, 0, 1, 1, 2, 2, 0, 1], ["train"] * 6 + ["test"] * 2)
    assert ok.error() is None
    assert ok.warnings() == ["classes absent from the holdout (no usable test/ image): c"]
    pool = ClassCounts.of(names, [0, 0, 1, 2, 2], ["pool"] * 5)
    assert pool.test is None and pool.error() is None
    assert pool.warnings() == ["classes with a single training image (absent from validation): b"]
    assert ClassCounts.of(names, [0, 1, 2], ["train", "train", "test"]).error() == (
        "1 class(es) have no usable training image: c (empty folders, or every file was skipped)"
    )
    assert (
        ClassCounts.of(["a"], [0, 0], ["train", "test"])
        .error()
        .startswith("only 1 class (a) has usable training images")
    )
    assert ClassCounts.of([], [], []).error().startswith("no class has usable training images")


# --------------------------------------------------------------------------- decoding


def _halves(width: int, height: int, left=(255, 0, 0), right=(0, 0, 255)) -> np.ndarray:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = left
    arr[:, width // 2 :] = right
    return arr


def _image_in_mode(mode: str) -> Image.Image:
    rgb = Image.fromarray(_halves(24, 16, left=(200, 40, 40), right=(40, 40, 200)))
    if mode == "I;16":
        ramp = (np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * 170).astype(np.uint16)  # up to ~65000
        return Image.fromarray(ramp)
    if mode == "P+transparency":
        return rgb.convert("P")
    return rgb.convert(mode)


@pytest.mark.parametrize(
    "mode,suffix",
    [("L", ".png"), ("CMYK", ".jpg"), ("P", ".png"), ("RGBA", ".png"), ("I;16", ".png"), ("1", ".png"), ("L", ".jpg")],
)
def test_every_mode_becomes_rgb_uint8(tmp_path, mode, suffix):
    path = tmp_path / f"img{suffix}"
    img = _image_in_mode(mode)
    img.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really is in that mode
    arr = decode_image(path, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8


def test_grayscale_is_grey_rgb(tmp_path):
    Image.fromarray(_halves(16, 16)).convert("L").save(tmp_path / "g.png")
    arr = decode_image(tmp_path / "g.png", 16).astype(int)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_sixteen_bit_keeps_its_range(tmp_path):
    _image_in_mode("I;16").save(tmp_path / "deep.png")
    arr = decode_image(tmp_path / "deep.png", 16, "stretch")
    assert arr.min() < 30 and arr.max() > 220  # scaled to 8 bits, not clipped to white
    assert (arr[..., 0] == arr[..., 2]).all()


def test_transparency_is_composited_on_white(tmp_path):
    arr = np.zeros((16, 16, 4), np.uint8)
    arr[:, :8] = (255, 0, 0, 255)  # opaque red
    arr[:, 8:] = (0, 255, 0, 0)  # fully transparent
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "rgba.png")
    out = decode_image(tmp_path / "rgba.png", 16, "stretch")
    assert tuple(out[8, 2]) == (255, 0, 0)
    assert tuple(out[8, 13]) == (255, 255, 255)

    pal = Image.new("P", (16, 16))
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 8, 16))  # left half opaque blue, right half index 0 = transparent
    pal.save(tmp_path / "pal.png", transparency=0)
    with Image.open(tmp_path / "pal.png") as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
    out = decode_image(tmp_path / "pal.png", 16, "stretch")
    assert tuple(out[8, 2]) == (0, 0, 255)
    assert tuple(out[8, 13]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 32 wide x 16 high, red left / blue right; orientation 6 = shown rotated 90 degrees
    # clockwise, i.e. 16 wide x 32 high with red on top.
    img = Image.fromarray(_halves(32, 16))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    img.save(tmp_path / "plain.jpg", quality=95)

    def is_red(px):
        return px[0] > 180 and px[2] < 80

    def is_blue(px):
        return px[2] > 180 and px[0] < 80

    plain = decode_image(tmp_path / "plain.jpg", 16, "stretch")
    assert is_red(plain[1, 1]) and is_red(plain[14, 1]) and is_blue(plain[1, 14]) and is_blue(plain[14, 14])
    rotated = decode_image(tmp_path / "rotated.jpg", 16, "stretch")
    assert is_red(rotated[1, 1]) and is_red(rotated[1, 14]), "top half should be red after rotation"
    assert is_blue(rotated[14, 1]) and is_blue(rotated[14, 14]), "bottom half should be blue after rotation"
    # center_crop keeps the rotated aspect: the 16x32 picture is cut to its middle square.
    cropped = decode_image(tmp_path / "rotated.jpg", 16, "center_crop")
    assert is_red(cropped[0, 8]) and is_blue(cropped[15, 8])


def test_center_crop_and_bbox(tmp_path):
    arr = np.zeros((16, 48, 3), np.uint8)
    arr[:, :16] = (255, 0, 0)
    arr[:, 16:32] = (0, 255, 0)
    arr[:, 32:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    centre = decode_image(tmp_path / "wide.png", 8, "center_crop")
    assert (centre[..., 1] > 200).all() and (centre[..., 0] < 50).all()  # only the green middle
    left = decode_image(tmp_path / "wide.png", 8, "stretch", bbox=(0, 0, 16, 16))
    assert (left[..., 0] > 200).all() and (left[..., 2] < 50).all()
    with pytest.raises(ImageProblem, match="bounding box"):
        decode_image(tmp_path / "wide.png", 8, bbox=(100, 100, 120, 120))


@pytest.mark.parametrize("kind", ["zero.jpg", "notes.jpg", "truncated.jpg"])
def test_decode_image_raises_image_problem(tmp_path, kind):
    _write_bad_files(tmp_path)
    with pytest.raises(ImageProblem):
        decode_image(tmp_path / kind, 16)


def test_unknown_resize_mode_rejected(split_dataset, cache_dir):
    with pytest.raises(ValueError, match="resize_mode"):
        load_cache(scan_folders(split_dataset), 16, cache_dir, resize_mode="squash", show_progress=False)


# --------------------------------------------------------------------------- cache


def test_cache_matches_direct_decode(split_dataset, cache_dir):
    cache = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    assert cache.decoded == len(cache) == 24
    assert cache.class_names == ["class_0", "class_1", "class_2"]
    for row in (0, 7, 23):
        np.testing.assert_array_equal(cache.images[row], decode_image(cache.paths[row], 16))
        assert Path(cache.paths[row]).parent.name == cache.class_names[cache.labels[row]]
        assert Path(cache.paths[row]).parent.parent.name == cache.splits[row]


def test_second_load_decodes_nothing(split_dataset, cache_dir):
    first = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    second = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    assert second.decoded == 0
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(np.asarray(second.images), first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.splits, first.splits)
    assert second.paths == first.paths and second.class_names == first.class_names


def test_changed_file_invalidates_and_is_the_only_one_decoded(pool_dataset, cache_dir):
    first = load_cache(scan_folders(pool_dataset), 16, cache_dir, workers=1, show_progress=False)
    changed = Path(first.paths[5])
    Image.new("RGB", (16, 16), (255, 255, 255)).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    second = load_cache(scan_folders(pool_dataset), 16, cache_dir, workers=1, show_progress=False)
    assert second.fingerprint != first.fingerprint
    assert second.decoded == 1
    assert second.paths == first.paths
    assert (second.images[5] == 255).all()
    others = np.arange(len(first)) != 5
    np.testing.assert_array_equal(second.images[others], first.images[others])

    third = load_cache(scan_folders(pool_dataset), 16, cache_dir, workers=1, show_progress=False)
    assert third.decoded == 0 and third.fingerprint == second.fingerprint


def test_other_resolution_is_a_separate_cache(pool_dataset, cache_dir):
    a = load_cache(scan_folders(pool_dataset), 16, cache_dir, workers=1, show_progress=False)
    b = load_cache(scan_folders(pool_dataset), 8, cache_dir, workers=1, show_progress=False)
    assert a.fingerprint != b.fingerprint and b.decoded == len(b)
    assert b.images.shape[1:] == (8, 8, 3)


def test_parallel_decode_equals_serial(tmp_path):
    root = write_class_folders(tmp_path / "many", num_classes=2, per_class=36, test_per_class=None, size=16)
    serial = load_cache(scan_folders(root), 16, tmp_path / "c1", workers=1, show_progress=False)
    parallel = load_cache(scan_folders(root), 16, tmp_path / "c2", workers=2, show_progress=False)
    assert parallel.decoded == serial.decoded == 72  # a worker count given: the process pool is used
    np.testing.assert_array_equal(parallel.images, serial.images)


# --------------------------------------------------------------------------- splits


def _fake_cache(counts: list[int], test_counts: list[int] | None = None) -> ImageCache:
    """An ImageCache with only labels/splits filled in (splits never look at pixels)."""
    labels, splits = [], []
    for c, n in enumerate(counts):
        labels += [c] * n
        splits += ["train" if test_counts is not None else "pool"] * n
    for c, n in enumerate(test_counts or []):
        labels += [c] * n
        splits += ["test"] * n
    order = np.random.default_rng(123).permutation(len(labels))  # classes interleaved, like real data
    n = len(labels)
    return ImageCache(
        images=np.zeros((n, 1, 1, 3), np.uint8),
        labels=np.array(labels, dtype=np.int64)[order],
        splits=np.array(splits, dtype="<U5")[order],
        paths=[f"f{i}" for i in range(n)],
        class_names=[f"c{c}" for c in range(len(counts))],
        problems=[],
        fingerprint="fake",
        image_size=1,
    )


UNEVEN = [1, 2, 3, 5, 8, 13, 40, 97]


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("train_ratio", [0.1, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("holdout_fraction", [0.0, 0.2, 0.5])
def test_pool_splits_are_stratified_disjoint_and_complete(seed, train_ratio, holdout_fraction):
    cache = _fake_cache(UNEVEN)
    s = make_splits(cache, train_ratio, holdout_fraction, seed)
    parts = np.concatenate([s.train, s.val, s.holdout])
    assert len(parts) == len(np.unique(parts)) == len(cache)  # disjoint and covering
    for part in (s.train, s.val, s.holdout):
        assert (np.diff(part) > 0).all()  # sorted row indices
    for c, n in enumerate(UNEVEN):
        n_holdout = int((cache.labels[s.holdout] == c).sum())
        n_train = int((cache.labels[s.train] == c).sum())
        n_pool = n - n_holdout
        assert abs(n_holdout - holdout_fraction * n) <= 1, (c, n_holdout)
        assert abs(n_train - train_ratio * n_pool) <= 1, (c, n_train)
        assert n_train >= 1, f"class {c} missing from train"


@pytest.mark.parametrize("holdout_fraction", [0.1, 0.3])
def test_splits_reproducible_for_a_seed(holdout_fraction):
    cache = _fake_cache(UNEVEN)
    a = make_splits(cache, 0.6, holdout_fraction, split_seed=3)
    b = make_splits(cache, 0.6, holdout_fraction, split_seed=3)
    c = make_splits(cache, 0.6, holdout_fraction, split_seed=4)
    for name in ("train", "val", "holdout"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.train, c.train)
    assert not np.array_equal(a.holdout, c.holdout)


def test_holdout_does_not_move_with_train_ratio():
    cache = _fake_cache(UNEVEN)
    holdouts = [make_splits(cache, r, 0.25, split_seed=11).holdout for r in (0.2, 0.5, 0.8, 0.9)]
    for h in holdouts[1:]:
        np.testing.assert_array_equal(h, holdouts[0])
    pool, holdout = holdout_indices(cache, 0.25, 11)
    np.testing.assert_array_equal(holdout, holdouts[0])
    np.testing.assert_array_equal(np.sort(np.concatenate([pool, holdout])), np.arange(len(cache)))


def test_test_folder_is_the_holdout():
    cache = _fake_cache([6, 9, 4], test_counts=[2, 3, 1])
    is_test = np.flatnonzero(cache.splits == "test")
    for holdout_fraction in (0.0, 0.2, 0.6):
        for ratio in (0.3, 0.7):
            s = make_splits(cache, ratio, holdout_fraction, split_seed=0)
            np.testing.assert_array_equal(s.holdout, is_test)
            assert set(s.train) | set(s.val) == set(np.flatnonzero(cache.splits == "train"))
            assert set(cache.labels[s.train]) == {0, 1, 2}


def test_test_folder_is_the_holdout_on_a_real_dataset(split_dataset, cache_dir):
    cache = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    s = make_splits(cache, 0.5, 0.3, split_seed=0)
    assert s.sizes() == {"train": 9, "val": 9, "holdout": 6}
    assert all(Path(cache.paths[i]).parent.parent.name == "test" for i in s.holdout)
    assert all(Path(cache.paths[i]).parent.parent.name == "train" for i in np.concatenate([s.train, s.val]))


@pytest.mark.parametrize("holdout_fraction", [0.05, 0.2, 0.5, 0.95])
def test_a_drawn_holdout_misses_exactly_the_classes_too_small_for_it(holdout_fraction):
    # Each class keeps round((1 - f) n) images in the pool, and at least one: the holdout gets
    # none of a class with n * f <= 0.5, or of a single image. The report must name them.
    cache = _fake_cache(UNEVEN)
    pool, holdout = holdout_indices(cache, holdout_fraction, split_seed=0)
    expected = [f"c{c}" for c, n in enumerate(UNEVEN) if n == 1 or n * holdout_fraction <= 0.5]
    held = np.bincount(cache.labels[holdout], minlength=len(UNEVEN))
    assert [f"c{c}" for c in np.flatnonzero(held == 0)] == expected
    notes = holdout_warnings(cache, exclude_copies(pool, holdout, {}), holdout_fraction)
    assert notes == [
        f"classes absent from the holdout (too few images for a {holdout_fraction:.0%} draw): {', '.join(expected)}"
    ]


def test_holdout_warnings_name_unscored_classes_once():
    cache = _fake_cache([3, 3, 10])
    pool, holdout = holdout_indices(cache, 0.2, split_seed=0)
    assert holdout_warnings(cache, exclude_copies(pool, holdout, {}), 0.2) == []  # 3 images give the holdout one
    only_c1 = [i for i, row in enumerate(holdout) if cache.labels[row] == 1]
    assert holdout_warnings(cache, exclude_copies(pool, holdout, {only_c1[0]: [0]}), 0.2) == [
        "classes absent from the holdout (every holdout image copies a training image): c1"
    ]
    assert holdout_warnings(cache, exclude_copies(*holdout_indices(cache, 0.0, 0), {}), 0.0) == []  # no holdout at all
    tested = _fake_cache([3, 3], test_counts=[1, 0])
    assert (
        holdout_warnings(tested, exclude_copies(*holdout_indices(tested, 0.2, 0), {}), 0.2) == []
    )  # check_classes names c1


def test_stratified_partition_is_nested_across_fractions():
    labels = np.repeat(np.arange(4), 25)
    idx = np.arange(len(labels))
    small, _ = stratified_partition(idx, labels, 0.2, seed=5)
    large, _ = stratified_partition(idx, labels, 0.6, seed=5)
    assert set(small) <= set(large)
    assert np.bincount(labels[small]).tolist() == [5, 5, 5, 5]


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_train_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="train_ratio"):
        make_splits(_fake_cache([5, 5]), ratio, 0.2, 0)


# --------------------------------------------------------------------------- device batches


def test_normalize_uses_imagenet_statistics():
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    out = normalize(x)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_augment_keeps_shape_and_is_seeded():
    x = _batch()
    cpu = torch.device("cpu")
    a = augment_batch(x, Augment(), runtime.generator(1, cpu))
    b = augment_batch(x, Augment(), runtime.generator(1, cpu))
    c = augment_batch(x, Augment(), runtime.generator(2, cpu))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)


def test_augment_disabled_is_identity():
    x = _batch()
    out = augment_batch(x, Augment(enabled=False), runtime.generator(0, torch.device("cpu")))
    assert torch.equal(out, x)


def test_augment_full_crop_is_identity_or_flip():
    x = _batch()
    full = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False)
    torch.testing.assert_close(augment_batch(x, full, runtime.generator(0, torch.device("cpu"))), x, atol=1e-5, rtol=0)
    flips = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=True)
    out = augment_batch(x, flips, runtime.generator(0, torch.device("cpu")))
    flipped = [bool(torch.allclose(o, xi.flip(-1), atol=1e-5)) for o, xi in zip(out, x)]
    kept = [bool(torch.allclose(o, xi, atol=1e-5)) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped)


def test_device_data_batches(split_dataset, cache_dir):
    cache = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    data = DeviceData(cache, torch.device("cpu"))
    idx = np.array([3, 1, 4, 15, 9, 2, 6])
    ordered = list(data.batches(idx, 3))
    assert [len(y) for _, y in ordered] == [3, 3, 1]
    assert torch.equal(torch.cat([y for _, y in ordered]), torch.from_numpy(cache.labels[idx]))
    x0, _ = ordered[0]
    torch.testing.assert_close(x0, normalize(torch.from_numpy(np.asarray(cache.images[idx[:3]]))))

    shuffled = list(data.batches(idx, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in shuffled] == [3, 3]  # the single trailing image is dropped
    again = list(data.batches(idx, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(shuffled, again))


def test_changed_file_is_the_only_one_decoded_even_beside_bad_files(split_dataset, cache_dir):
    _write_bad_files(split_dataset / "test" / "class_0")
    load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    changed = split_dataset / "train" / "class_1" / "img_000.png"
    make_image(2, 16, np.random.default_rng(9)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    again = load_cache(scan_folders(split_dataset), 16, cache_dir, workers=1, show_progress=False)
    assert again.decoded == 1  # the bad files' failures are remembered, not retried
    assert len(again.problems) == 3
