"""predict.py: top-k predictions of a checkpoint for files and folders, bad files reported."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from test_export import EXPORT_CLASSES, export_once

from transferstudy import predict as predict_mod
from transferstudy.export import OnnxModel
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
    assert [line.split(":")[0] for line in out.err.splitlines()] == ["predict"]  # progress, no error


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


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """The model test_export.py exports (once per session), with its checkpoint."""
    return export_once(tmp_path_factory)


@pytest.fixture
def mixed_photos(photos):
    """The three good images plus a corrupt .jpg and an empty .png inside the folder."""
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated JPEG")
    (photos / "more" / "empty.png").write_bytes(b"")
    return photos


def _classes(results):
    return {r["path"]: [name for name, _ in r["top"]] for r in results}


def test_folder_and_checkpoint_of_one_model_predict_the_same(exported, photos):
    files = predict_mod.expand([photos])
    cpu = torch.device("cpu")
    model, meta = predict_mod.load_model(exported.checkpoint, cpu)
    from_checkpoint = predict_mod.predict(model, meta, files, cpu, k=3)
    for runtime in ("onnx", "torch"):
        model, meta = predict_mod.load_model(exported.folder, cpu, runtime)
        from_folder = predict_mod.predict(model, meta, files, cpu, k=3)
        assert _classes(from_folder) == _classes(from_checkpoint)
        for a, b in zip(from_folder, from_checkpoint):
            np.testing.assert_allclose([p for _, p in a["top"]], [p for _, p in b["top"]], atol=1e-5)
    model, _ = predict_mod.load_model(exported.folder / "model.json", cpu)
    assert isinstance(model, OnnxModel)  # auto: ONNX Runtime when installed


def test_main_from_folder_skips_unreadable_images_in_json(exported, mixed_photos, tmp_path, capsys):
    out_file = tmp_path / "predictions.json"
    code = predict_mod.main(
        [str(exported.folder), str(mixed_photos), "--format", "json", "--out", str(out_file), "--batch-size", "2"]
    )
    err = capsys.readouterr().err
    assert code == 1
    corrupt, empty = mixed_photos / "corrupt.jpg", mixed_photos / "more" / "empty.png"
    assert f"{corrupt}: skipped: " in err and f"{empty}: skipped: empty file" in err
    doc = json.loads(out_file.read_text())
    assert (doc["images"], doc["skipped"]) == (5, 2)
    rows = {Path(r["path"]).name: r for r in doc["predictions"]}
    assert [Path(r["path"]).relative_to(mixed_photos).as_posix() for r in doc["predictions"]] == [
        "a.png",
        "b.jpg",
        "corrupt.jpg",
        "more/c.png",
        "more/empty.png",
    ]
    for name in ("corrupt.jpg", "empty.png"):
        assert rows[name]["top"] == [] and rows[name]["error"]
    for name in ("a.png", "b.jpg", "c.png"):
        row = rows[name]
        assert row["error"] is None and len(row["top"]) == 3  # k is capped at the number of classes
        assert {t["class"] for t in row["top"]} == set(EXPORT_CLASSES)
        probs = [t["probability"] for t in row["top"]]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5


def test_main_csv_has_one_row_per_image_with_named_columns(exported, mixed_photos, tmp_path, capsys):
    out_file = tmp_path / "predictions.csv"
    code = predict_mod.main(
        [str(exported.checkpoint), str(mixed_photos), "--format", "csv", "--out", str(out_file), "-k", "2"]
    )
    assert code == 1 and "corrupt.jpg: skipped" in capsys.readouterr().err
    with open(out_file, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["path", "class_1", "probability_1", "class_2", "probability_2", "error"]
    assert len(rows) == 5
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(good) == 3 and {Path(r["path"]).name for r in bad} == {"corrupt.jpg", "empty.png"}
    assert all(r["class_1"] == "" and r["probability_1"] == "" for r in bad)
    for r in good:
        assert {r["class_1"], r["class_2"]} <= set(EXPORT_CLASSES) and r["class_1"] != r["class_2"]
        assert 1 >= float(r["probability_1"]) >= float(r["probability_2"]) >= 0


def test_main_text_to_file_matches_stdout(exported, photos, tmp_path, capsys):
    assert predict_mod.main([str(exported.folder), str(photos)]) == 0
    printed = capsys.readouterr().out
    assert predict_mod.main([str(exported.folder), str(photos), "--out", str(tmp_path / "p.txt")]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "p.txt").read_text() == printed and len(printed.splitlines()) == 3 * 4


def test_main_refuses_a_folder_without_model_json(photos, capsys):
    assert predict_mod.main([str(photos), str(photos)]) == 2
    assert "not an exported model folder" in capsys.readouterr().err


def test_progress_counts_every_file(checkpoint, mixed_photos, caplog):
    path, _ = checkpoint
    model, meta = load_checkpoint(path)
    files = predict_mod.expand([mixed_photos])
    with caplog.at_level(logging.INFO, logger="transferstudy"):
        results = list(
            predict_mod.iter_predictions(model, meta, files, torch.device("cpu"), batch_size=2, show_progress=True)
        )
    assert len(results) == len(files) == 5
    assert caplog.records[-1].getMessage().startswith("predict: 5/5 img")
