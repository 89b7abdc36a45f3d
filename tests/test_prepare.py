"""prepare / open_dataset on class folders: layouts, bad input, the files written, and reruns."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transferstudy import images
from transferstudy.datasets import DatasetError, hashes, read_manifest, scan_folders
from transferstudy.datasets.open import open_dataset
from transferstudy.datasets.prepare import prepare

CLASSES = ["Citroën C4 Picasso 2012", "Ram C-V Cargo Van 2012", "Škoda Octavia 2011"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20), fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_folders(root: Path, per_class: dict[str, int] | None = None, classes=CLASSES) -> Path:
    """root/train/<class>/ and root/test/<class>/ with distinct random images."""
    seed = 0
    for split, n in (per_class or {"train": 3, "test": 2}).items():
        for name in classes:
            for i in range(n):
                seed += 1
                write_image(root / split / name / f"{i:03d}.jpg", seed)
    return root


def problems_csv(result) -> dict[str, str]:
    frame = pd.read_csv(result.problems_path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["file", "problem"]
    return {Path(f).name: p for f, p in zip(frame["file"], frame["problem"])}


def run(source, dest, **kw):
    return prepare(source, dest, show_progress=False, **kw)


# --------------------------------------------------------------------------- layouts


def test_train_test_layout_and_outputs(tmp_path):
    src = write_folders(tmp_path / "cars")
    result = run(src, tmp_path / "out")
    assert result.problems == [] and problems_csv(result) == {}
    assert result.index.class_names == CLASSES
    assert result.n_hashed == result.n_decoded == 15

    manifest = pd.read_csv(result.manifest_path, dtype=str, keep_default_na=False)
    assert list(manifest.columns) == [
        "path",
        "class",
        "label",
        "split",
        "width",
        "height",
        "bbox",
        "sha256",
        "size",
        "mtime_ns",
    ]
    assert sorted(set(manifest["class"])) == CLASSES
    assert set(manifest["width"]) == {"24"} and set(manifest["height"]) == {"20"}
    first = Path(manifest["path"][0])
    assert manifest["sha256"][0] == hashes.sha256_file(first) and len(manifest["sha256"][0]) == 64

    summary = json.loads(result.summary_path.read_text(encoding="utf-8"))
    assert summary["images"] == 15 and summary["classes"] == 3
    assert summary["splits"] == {"train": 9, "test": 6}
    assert summary["class_histogram"][2] == {"label": 2, "class": "Škoda Octavia 2011", "train": 3, "test": 2}
    assert summary["image_sizes"]["width"]["median"] == 24
    assert summary["image_sizes"]["most_common"] == [{"width": 24, "height": 20, "count": 15}]
    assert summary["image_sizes"]["shorter_side_histogram"]["0-63"] == 15


def test_manifest_reads_back_as_the_same_dataset(tmp_path):
    src = write_folders(tmp_path / "cars")
    result = run(src, tmp_path / "out")
    for path in (tmp_path / "out", result.manifest_path):
        index = open_dataset(path)
        assert index.source == "manifest"
        assert index.class_names == CLASSES  # spaces and non-ASCII letters survive the CSV
        assert index.samples == scan_folders(src).samples
        assert index.root == src.resolve()
    cache = images.load_cache(open_dataset(tmp_path / "out"), 16, tmp_path / "cache16", show_progress=False)
    assert len(cache) == 15 and list(cache.class_names) == CLASSES


def test_nested_car_data_layout(tmp_path):
    write_folders(tmp_path / "car_data" / "car_data")
    (tmp_path / "car_data" / "anno_train.csv").write_text("x\n")  # the Kaggle copy has loose files here
    (tmp_path / "car_data" / "names.csv").write_text("x\n")
    index = open_dataset(tmp_path / "car_data")
    assert index.root == (tmp_path / "car_data" / "car_data").resolve()
    assert index.class_names == CLASSES
    assert {s.split for s in index.samples} == {"train", "test"}


def test_single_pool_of_class_folders(tmp_path):
    for c, name in enumerate(CLASSES):
        for i in range(2):
            write_image(tmp_path / "pool" / name / f"{i}.jpg", seed=10 * c + i)
    result = run(tmp_path / "pool", tmp_path / "out")
    assert {s.split for s in result.index.samples} == {"pool"}
    assert json.loads(result.summary_path.read_text())["splits"] == {"pool": 6}


def test_class_only_in_test_is_a_clear_error(tmp_path):
    src = write_folders(tmp_path / "cars")
    write_image(src / "test" / "Lonely Class" / "0.jpg", 99)
    with pytest.raises(DatasetError, match="only in test/: Lonely Class"):
        run(src, tmp_path / "out")


# --------------------------------------------------------------------------- bad input


def test_bad_files_are_reported_not_fatal(tmp_path, monkeypatch, caplog):
    src = write_folders(tmp_path / "cars")
    train = src / "train" / CLASSES[0]
    # truncated JPEG: a large noisy image cut in half
    whole = write_image(tmp_path / "whole.jpg", 7, size=(64, 64)).read_bytes()
    (train / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (train / "empty.jpg").write_bytes(b"")
    (train / "notes.jpg").write_text("not an image")
    write_image(train / "huge.png", 8, size=(100, 100), fmt="PNG")
    monkeypatch.setattr(images.decode, "MAX_IMAGE_PIXELS", 5000)  # 100x100 is "too large", 64x64 is not
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    # operating-system litter is skipped silently
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (train / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (src / ".DS_Store").write_bytes(b"\0")
    # a link to an image works; a broken one is reported
    (train / "linked.jpg").symlink_to(write_image(tmp_path / "outside.jpg", 9))
    (train / "broken.jpg").symlink_to(tmp_path / "missing.jpg")

    with caplog.at_level(logging.WARNING, logger="transferstudy.prepare"):
        result = run(src, tmp_path / "out")
    found = problems_csv(result)
    assert set(found) == {"truncated.jpg", "empty.jpg", "notes.jpg", "huge.png", "broken.jpg"}
    assert "truncated" in found["truncated.jpg"]
    assert found["empty.jpg"] == "empty file (0 bytes)"
    assert "not an image" in found["notes.jpg"]
    assert "too large" in found["huge.png"]
    assert found["broken.jpg"] == "broken symbolic link"

    kept = {s.path.name for s in result.index.samples}
    assert "linked.jpg" in kept and not kept & set(found)
    assert not {".DS_Store", "Thumbs.db"} & kept
    assert len(result.index.samples) == 16
    manifest = pd.read_csv(result.manifest_path, dtype=str)
    assert len(manifest) == 16
    # one table on the console, with relative paths
    table = [r.getMessage() for r in caplog.records if "problem(s)" in r.getMessage()]
    assert len(table) == 1 and f"train/{CLASSES[0]}/truncated.jpg" in table[0]


def test_train_test_leak_is_reported(tmp_path):
    src = write_folders(tmp_path / "cars")
    copy = src / "test" / CLASSES[1] / "copy.jpg"
    copy.write_bytes((src / "train" / CLASSES[1] / "001.jpg").read_bytes())
    result = run(src, tmp_path / "out")
    found = problems_csv(result)
    assert list(found) == ["copy.jpg"]
    assert "train/test leak" in found["copy.jpg"] and f"{CLASSES[1]}/001.jpg" in found["copy.jpg"]
    assert copy.absolute() in {s.path for s in result.index.samples}  # reported, not removed


def test_class_without_usable_training_image(tmp_path):
    src = write_folders(tmp_path / "cars")
    for p in (src / "train" / CLASSES[2]).iterdir():
        p.write_bytes(b"")
    with pytest.raises(DatasetError, match=f"no usable training image: {CLASSES[2]}"):
        run(src, tmp_path / "out")
    found = pd.read_csv(tmp_path / "out" / "problems.csv", dtype=str)
    assert f"class {CLASSES[2]}" in set(found["file"]) and (found["problem"] == "empty file (0 bytes)").sum() == 3


def test_a_single_class_is_refused_in_one_line_after_the_files_are_written(tmp_path):
    src = write_folders(tmp_path / "one", classes=CLASSES[:1])
    (src / "train" / CLASSES[0] / "zero.jpg").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        run(src, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"only 1 class ({CLASSES[0]}) has usable training images") and "\n" not in message
    found = pd.read_csv(tmp_path / "out" / "problems.csv", dtype=str)
    assert list(found["problem"]) == ["empty file (0 bytes)"]  # checked file by file: the bad file, and only it
    assert len(read_manifest(tmp_path / "out" / "manifest.csv").samples) == 5


def test_nothing_decodes(tmp_path):
    (tmp_path / "pool" / "a").mkdir(parents=True)
    (tmp_path / "pool" / "a" / "x.jpg").write_text("no")
    with pytest.raises(DatasetError, match="no usable training image: a"):
        run(tmp_path / "pool", tmp_path / "out")
    assert "not an image" in (tmp_path / "out" / "problems.csv").read_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "nowhere"}, "dataset not found"),
        ({"format": "zip"}, "unknown dataset format 'zip'"),
        ({"format": "stanford-devkit"}, "not a Stanford Cars devkit"),
        ({"format": "manifest"}, "manifest not found"),
        ({"crop": "bbox"}, "needs bounding boxes"),
        ({"crop": "tight"}, "unknown crop 'tight'"),
        ({"dest": "cars/out"}, "lies inside the dataset"),
    ],
)
def test_wrong_input_gives_one_line_error(tmp_path, kwargs, message):
    write_folders(tmp_path / "cars")
    args = {"source": "cars", "dest": "out", **kwargs}
    args["source"], args["dest"] = tmp_path / args["source"], tmp_path / args["dest"]
    with pytest.raises(DatasetError, match=message) as err:
        run(**args)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_a_file_is_not_a_dataset(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"PK")
    with pytest.raises(DatasetError, match="is a file"):
        open_dataset(tmp_path / "x.zip")


def test_hand_written_manifest(tmp_path):
    for i in range(3):
        write_image(tmp_path / "imgs" / f"{i}.png", i, fmt="PNG")
    (tmp_path / "m.csv").write_text("path,class,bbox\nimgs/0.png,b,\nimgs/1.png,a,1 2 10 12\nimgs/2.png,2012,\n")
    index = open_dataset(tmp_path / "m.csv")
    assert index.class_names == ["2012", "a", "b"]  # a numeric-looking name stays text
    assert [(s.path, s.label, s.split, s.bbox) for s in index.samples] == [
        (tmp_path / "imgs" / "0.png", 2, "pool", None),
        (tmp_path / "imgs" / "1.png", 1, "pool", (1, 2, 10, 12)),
        (tmp_path / "imgs" / "2.png", 0, "pool", None),
    ]
    (tmp_path / "bad.csv").write_text("file,label\nx.png,0\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_manifest(tmp_path / "bad.csv")


# --------------------------------------------------------------------------- reruns


def test_second_prepare_does_no_work_and_a_changed_file_is_picked_up(tmp_path, monkeypatch):
    src = write_folders(tmp_path / "cars")
    first = run(src, tmp_path / "out")
    manifest_before = first.manifest_path.read_text(encoding="utf-8")

    def forbidden(*args, **kwargs):
        raise AssertionError("unchanged files must not be read again")

    with monkeypatch.context() as m:
        m.setattr(hashes, "sha256_file", forbidden)
        m.setattr(images.cache, "decode_image", forbidden)
        second = run(src, tmp_path / "out")
    assert (second.n_hashed, second.n_decoded) == (0, 0)
    assert second.manifest_path.read_text(encoding="utf-8") == manifest_before

    changed = src / "train" / CLASSES[0] / "001.jpg"
    write_image(changed, 1234, size=(30, 26))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse file-system clocks
    write_image(src / "test" / CLASSES[2] / "new.jpg", 4321)
    third = run(src, tmp_path / "out")
    assert (third.n_hashed, third.n_decoded) == (2, 2)
    rows = pd.read_csv(third.manifest_path, dtype=str).set_index("path")
    assert rows.loc[str(changed.absolute()), "sha256"] == hashes.sha256_file(changed)
    assert rows.loc[str(changed.absolute()), "width"] == "30"
    assert str((src / "test" / CLASSES[2] / "new.jpg").absolute()) in rows.index
    assert len(rows) == 16
    assert len(list((tmp_path / "out" / "cache").iterdir())) == 1  # prepare's own cache keeps the newest decode


def test_cli_wrong_source_or_format_is_one_line(tmp_path):
    from helpers import run_cli

    from flows.prepare import main

    for args in (["--source", str(tmp_path / "missing")], ["--source", str(tmp_path), "--format", "stanford-devkit"]):
        code, _, err = run_cli(main, [*args, "--dest", str(tmp_path / "out")])
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
