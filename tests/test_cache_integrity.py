"""Every file the project reads back checks itself: a damaged one is reported, never reused, and
rebuilt (the decode cache, the depth-0 feature cache, the previous manifest) or refused in one
line (a checkpoint)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_class_folders
from PIL import Image

from transferstudy.datasets import scan_folders
from transferstudy.datasets.prepare import prepare
from transferstudy.features import FeatureStore, _checksum
from transferstudy.images import Augment, DeviceData, Views, load_cache
from transferstudy.images import cache as cache_mod
from transferstudy.images.cache import IMAGES_FILE, META_FILE, cache_status, open_cache_folder, verify_cache
from transferstudy.model import build_model, load_checkpoint


def load(root: Path, cache_dir: Path):
    return load_cache(scan_folders(root), 16, cache_dir, workers=1, show_progress=False)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    """Same size, other content: only a checksum can tell."""
    data = bytearray(path.read_bytes())
    for i in (len(data) // 2, len(data) - 1):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_meta_key(folder: Path, key: str = "images") -> None:
    meta = json.loads((folder / META_FILE).read_text())
    del meta[key]
    (folder / META_FILE).write_text(json.dumps(meta))


def warnings_about(caplog, what) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(what) in r.getMessage()]


# --------------------------------------------------------------------------- decode cache

DAMAGES = {
    "images.npy cut short": (lambda folder: cut_in_half(folder / IMAGES_FILE), "bytes"),
    "images.npy bytes flipped": (lambda folder: flip_bytes(folder / IMAGES_FILE), "checksum"),
    "images.npy missing": (lambda folder: (folder / IMAGES_FILE).unlink(), "missing"),
    "meta.json not JSON": (lambda folder: (folder / META_FILE).write_text('{"version": 3, "pa'), "unreadable"),
    "meta.json lacks a key": (drop_meta_key, "lacks images"),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_decode_cache_is_reported_once_and_rebuilt(split_dataset, cache_dir, caplog, damage):
    damage_files, reason = damage
    first = load(split_dataset, cache_dir)
    expected = np.array(first.images)
    folder = cache_dir / first.fingerprint
    damage_files(folder)

    with caplog.at_level(logging.WARNING):
        again = load(split_dataset, cache_dir)
    (warning,) = warnings_about(caplog, folder)
    assert reason in warning
    assert again.decoded == len(again) == 24
    np.testing.assert_array_equal(again.images, expected)
    assert again.paths == first.paths and (again.labels == first.labels).all()
    assert verify_cache(folder) is None
    assert load(split_dataset, cache_dir).decoded == 0


def test_damaged_earlier_cache_lends_no_rows(pool_dataset, cache_dir, caplog):
    first = load(pool_dataset, cache_dir)
    flip_bytes(cache_dir / first.fingerprint / IMAGES_FILE)
    changed = Path(first.paths[5])
    Image.new("RGB", (16, 16), (255, 255, 255)).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))

    with caplog.at_level(logging.WARNING):
        second = load(pool_dataset, cache_dir)
    assert len(warnings_about(caplog, cache_dir / first.fingerprint)) == 1
    assert second.decoded == len(second) == 30  # nothing copied from the damaged cache
    assert (second.images[5] == 255).all()
    others = np.arange(len(first)) != 5
    np.testing.assert_array_equal(second.images[others], first.images[others])
    assert [p.name for p in cache_dir.iterdir()] == [second.fingerprint]


def test_cache_status_tells_a_damaged_cache_from_a_healthy_one(split_dataset, cache_dir):
    index = scan_folders(split_dataset)
    load(split_dataset, cache_dir)
    key, healthy = cache_status(index, 16, cache_dir)
    assert healthy and cache_status(index, 16, cache_dir) == (key, True)  # stable while intact: the task stays Cached

    fingerprint = key.split("-")[0]
    flip_bytes(cache_dir / fingerprint / IMAGES_FILE)
    assert cache_status(index, 16, cache_dir) == (key, False)  # same key, not healthy: the flow refreshes it
    assert (cache_dir / fingerprint).is_dir()  # checking changes nothing

    load(split_dataset, cache_dir)
    assert cache_status(index, 16, cache_dir) == (key, True)


def test_report_reader_refuses_a_damaged_cache(split_dataset, cache_dir, caplog):
    folder = cache_dir / load(split_dataset, cache_dir).fingerprint
    images, paths, why = open_cache_folder(folder)
    assert images.shape == (24, 16, 16, 3) and len(paths) == 24 and why == ""

    cut_in_half(folder / IMAGES_FILE)
    with caplog.at_level(logging.WARNING):
        images, paths, why = open_cache_folder(folder)
    assert images is None and paths == [] and str(folder) in why and "bytes" in why
    assert len(warnings_about(caplog, folder)) == 1 and not folder.exists()


def test_report_reader_reads_an_older_cache_as_it_is(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    np.save(folder / IMAGES_FILE, np.zeros((2, 4, 4, 3), dtype=np.uint8))
    (folder / META_FILE).write_text(json.dumps({"version": 2, "paths": ["a.png", "b.png"]}))  # no checksum yet
    images, paths, why = open_cache_folder(folder)
    assert images.shape == (2, 4, 4, 3) and paths == ["a.png", "b.png"] and why == ""
    cut_in_half(folder / IMAGES_FILE)
    images, _, why = open_cache_folder(folder)
    assert images is None and "unreadable" in why and folder.exists()  # not ours to judge: left in place


def test_sampled_checksum_of_a_large_cache_sees_a_zeroed_run(split_dataset, cache_dir, monkeypatch):
    # 4 blocks of 64 bytes stand in for 256 of 64 KiB: the 18 KB cache is then "large".
    monkeypatch.setattr(cache_mod, "SAMPLE_BLOCKS", 4)
    monkeypatch.setattr(cache_mod, "SAMPLE_BLOCK_BYTES", 64)
    path = cache_dir / load(split_dataset, cache_dir).fingerprint / IMAGES_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 4 : len(data) * 3 // 4] = bytes(len(data) // 2)  # a hole left by a partial copy
    path.write_bytes(bytes(data))
    assert "checksum" in verify_cache(path.parent)


# --------------------------------------------------------------------------- feature cache


CPU = torch.device("cpu")


def feature_store(disk_dir: Path) -> FeatureStore:
    """Two views, depth-0 files in ``disk_dir``."""
    return FeatureStore("t", Views(2, Augment(), 0), 0.5, disk_dir=disk_dir)


@pytest.fixture(scope="module")
def saved_features(tmp_path_factory):
    """A depth-0 feature file with view 0 of 2 built, and what is needed to open it again."""
    root = tmp_path_factory.mktemp("features")
    dataset = scan_folders(write_class_folders(root / "data", size=32))
    cache = load_cache(dataset, 32, root / "cache", workers=1, show_progress=False)
    data, pool = DeviceData(cache, CPU), np.arange(len(cache))
    model, _ = build_model(cache.num_classes, "none", 0)
    store = feature_store(root / "disk")
    features = store.get(model, data, pool, CPU)
    features.ensure_view(0, model, data, CPU)
    store.save(features)
    (path,) = (root / "disk").glob("features-*.pt")
    return model, data, pool, path


def rewrite(path: Path, **changes) -> None:
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, **changes}, path)


def wrong_shape(path: Path) -> None:
    views = torch.zeros(2, 24, 7)
    rewrite(path, views=views, checksum=_checksum(views))


def changed_values(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    saved["views"][0, 0, 0] += 1
    torch.save(saved, path)


def without_checksum(path: Path) -> None:
    saved = torch.load(path, weights_only=True)
    del saved["checksum"]
    torch.save(saved, path)


FEATURE_DAMAGES = {
    "cut short": (cut_in_half, "unreadable"),
    "wrong shape": (wrong_shape, "views of shape (2, 24, 7), expected (2, 24, 2048)"),
    "too many built flags": (lambda path: rewrite(path, built=[True, False, True]), "built flags"),
    "changed values": (changed_values, "checksum"),
    "no checksum (older file)": (without_checksum, "lacks checksum"),
}


@pytest.mark.parametrize("damage", FEATURE_DAMAGES.values(), ids=FEATURE_DAMAGES.keys())
def test_damaged_feature_file_is_reported_and_recomputed(saved_features, tmp_path, caplog, damage):
    model, data, pool, good = saved_features
    damage_file, reason = damage
    path = tmp_path / good.name
    path.write_bytes(good.read_bytes())
    damage_file(path)

    store = feature_store(tmp_path)
    with caplog.at_level(logging.WARNING):
        features = store.get(model, data, pool, CPU)
    (warning,) = warnings_about(caplog, path)
    assert reason in warning
    assert features.built == [False, False] and not path.exists()
    features.ensure_view(0, model, data, CPU)
    store.save(features)
    assert feature_store(tmp_path).get(model, data, pool, CPU).built == [True, False]  # healed


def test_intact_feature_file_is_loaded_without_warning(saved_features, tmp_path, caplog):
    model, data, pool, good = saved_features
    (tmp_path / good.name).write_bytes(good.read_bytes())
    with caplog.at_level(logging.WARNING):
        features = feature_store(tmp_path).get(model, data, pool, CPU)
    assert features.built == [True, False] and not warnings_about(caplog, tmp_path)


# --------------------------------------------------------------------------- manifest, checkpoint


def garble_hash(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1].replace(lines[1].split(",")[7], "0" * 63 + "x")  # the sha256 column
    path.write_text("".join(lines), encoding="utf-8")


MANIFEST_DAMAGES = {
    "binary garbage": (lambda path: path.write_bytes(bytes(range(256)) * 2), 24),
    "cut short": (lambda path: path.write_bytes(path.read_bytes()[:-40]), 1),
    "garbled hash": (garble_hash, 1),
}


@pytest.mark.parametrize("damage", MANIFEST_DAMAGES.values(), ids=MANIFEST_DAMAGES.keys())
def test_corrupt_previous_manifest_is_rehashed(make_dataset, tmp_path, caplog, damage):
    damage_file, rehashed = damage
    src = make_dataset()
    first = prepare(src, tmp_path / "out", show_progress=False)
    expected = first.manifest_path.read_text(encoding="utf-8")
    damage_file(first.manifest_path)

    with caplog.at_level(logging.WARNING):
        again = prepare(src, tmp_path / "out", show_progress=False)
    assert warnings_about(caplog, "previous manifest")
    assert again.n_hashed == rehashed and again.n_decoded == 0
    assert again.manifest_path.read_text(encoding="utf-8") == expected


def test_truncated_checkpoint_is_a_one_line_error_naming_it(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"arch": "resnet50", "state_dict": {"fc.weight": torch.zeros(196, 2048)}, "class_names": ["a"]}, path)
    cut_in_half(path)
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_problem_list_is_a_one_line_error_naming_it(tmp_path):
    from transferstudy.datasets import DatasetError
    from transferstudy.datasets.manifest import read_problems

    path = tmp_path / "problems.csv"
    path.write_bytes(b'file,problem\n"unterminated,\x00\xff\n')
    with pytest.raises(DatasetError) as err:
        read_problems(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_torn_demo_marker_rewrites_the_digits(tmp_path):
    from transferstudy.datasets.demo import MARKER, write_digits

    root = write_digits(tmp_path / "digits", per_class=2)
    (root / MARKER).write_text('{"torn')
    again = write_digits(tmp_path / "digits", per_class=2)
    assert json.loads((again / MARKER).read_text())  # written again, readable
    assert len(list(again.rglob("*.png"))) == 20
