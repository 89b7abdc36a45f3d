"""predict.py: top-k predictions of a checkpoint for files and folders, bad files reported."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image

from transferstudy import predict as predict_mod
from transferstudy.images import decode_image, normalize
from transferstudy.model import build_model, load_checkpoint, save_checkpoint

CLASS_NAMES = ["apple", "banana", "cherry", "damson", "elder", "fig"]
LINE = re.compile(r"^\s+(\d+\.\d\d)%\s+(\w+)$")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(len(CLASS_NAMES), weights="none", unfreeze_depth=1)
    with torch.no_grad():  # spread the head so the top-5 order is clear
        model.head.weight.mul_(50.0)
    path = save_checkpoint(tmp_path / "best.pt", model, CLASS_NAMES, image_size=16, resize_mode="center_crop")
    return path, model.eval()


@pytest.fixture
def photos(tmp_path):
    """Three good images (one in a sub-folder), a stray text file and a broken .jpg."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    make_image(0, 20, rng, width=28).save(folder / "a.png")
    make_image(1, 16, rng).save(folder / "b.jpg")
    make_image(2, 24, rng).save(folder / "more" / "c.png")
    (folder / "readme.txt").write_text("not a photo")
    (tmp_path / "broken.jpg").write_text("not a JPEG either")
    return folder


def test_expand_lists_image_files_sorted(photos):
    files = predict_mod.expand([photos, photos / "a.png"])
    assert [f.relative_to(photos).as_posix() for f in files] == ["a.png", "b.jpg", "more/c.png", "a.png"]


def test_round_trip_predictions_are_identical(checkpoint, photos):
    path, original = checkpoint
    model, meta = load_checkpoint(path)
    files = predict_mod.expand([photos])
    results = predict_mod.predict(model, meta, files, torch.device("cpu"), k=6)
    x = normalize(torch.from_numpy(np.stack([decode_image(f, 16) for f in files])))
    with torch.no_grad():
        expected = torch.softmax(original(x), 1).numpy()
    for r, probs in zip(results, expected):
        assert [name for name, _ in r["top"]] == [CLASS_NAMES[c] for c in np.argsort(-probs, kind="stable")]
        np.testing.assert_allclose([p for _, p in r["top"]], np.sort(probs)[::-1], rtol=1e-6)


def test_predict_reports_bad_files_in_order(checkpoint, photos):
    path, _ = checkpoint
    model, meta = load_checkpoint(path)
    broken = photos.parent / "broken.jpg"
    files = [photos / "a.png", broken, photos / "b.jpg", photos / "missing.png"]
    results = predict_mod.predict(model, meta, files, torch.device("cpu"), batch_size=1)
    assert [r["path"] for r in results] == [str(f) for f in files]
    assert "not an image" in results[1]["error"] and "top" not in results[1]
    assert "error" in results[3]
    for r in (results[0], results[2]):
        assert len(r["top"]) == 5
        probs = [p for _, p in r["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {name for name, _ in r["top"]} <= set(CLASS_NAMES)


def test_main_prints_top5_with_class_names(checkpoint, photos, capsys):
    path, _ = checkpoint
    assert predict_mod.main([str(path), str(photos), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 3 * 6
    for block in range(3):
        header, body = lines[6 * block], lines[6 * block + 1 : 6 * block + 6]
        assert Path(header).suffix in {".png", ".jpg"}
        matches = [LINE.match(line) for line in body]
        assert all(matches), body
        assert len({m.group(2) for m in matches}) == 5 and {m.group(2) for m in matches} <= set(CLASS_NAMES)
        shares = [float(m.group(1)) for m in matches]
        assert shares == sorted(shares, reverse=True)
    assert out.err == ""


def test_main_reports_a_bad_file_and_goes_on(checkpoint, photos, capsys):
    path, _ = checkpoint
    broken = photos.parent / "broken.jpg"
    code = predict_mod.main([str(path), str(broken), str(photos / "a.png"), "-k", "3", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 1
    assert str(broken) in out.err and "skipped" in out.err
    lines = out.out.splitlines()
    assert lines[0] == str(photos / "a.png") and len(lines) == 4
    assert all(LINE.match(line) for line in lines[1:])
