"""Holdout images that copy a training image: found by content hash, left out of the holdout
score, counted in the dataset summary and the report; hashes read once (datasets/hashes.py)."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from helpers import tiny_config

from transferstudy import report
from transferstudy import study as study_mod
from transferstudy.datasets import hashes
from transferstudy.datasets.prepare import prepare
from transferstudy.splits import holdout_indices
from transferstudy.study import attrs


def config(root, data_path, study=None, **data):
    """The tiny study config (16 px, random init, CPU) on the generated folders at ``data_path``."""
    return tiny_config(root, data={"path": str(data_path), "demo_per_class": 0, **data}, study=study or {})


def row_of(dataset, path) -> int:
    return dataset.cache.paths.index(str(path))


def overwrite(source, dest) -> None:
    """Copy ``source`` over ``dest``, its mtime a second later (coarse file-system clocks)."""
    shutil.copyfile(source, dest)
    st = os.stat(dest)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def forbid_hashing(monkeypatch):
    """Call it to make any further file hash fail the test."""

    def forbidden(path):
        pytest.fail(f"{path} was hashed again")

    return lambda: monkeypatch.setattr(hashes, "sha256_file", forbidden)


@pytest.fixture
def leaky_split(make_dataset):
    """train/ + test/ folders, with test/class_1/copy.png a byte copy of train/class_1/img_002.png."""
    root = make_dataset("leaky")
    shutil.copyfile(root / "train" / "class_1" / "img_002.png", root / "test" / "class_1" / "copy.png")
    return root


def test_test_file_copied_from_train_is_not_scored_and_is_counted(tmp_path, leaky_split):
    cfg = config(tmp_path, leaky_split)
    dataset = study_mod.decode_dataset(cfg, show_progress=False)
    rows = dataset.holdout_rows(cfg)
    copy = row_of(dataset, leaky_split / "test/class_1/copy.png")
    original = row_of(dataset, leaky_split / "train/class_1/img_002.png")
    assert rows.copies.tolist() == [copy] and rows.copy_of.tolist() == [original]
    assert copy not in rows.scored and len(rows.scored) == 3 * 2  # the generated test images all stay
    assert set(rows.scored) | {copy} == set(np.flatnonzero(dataset.cache.splits == "test"))

    summary = dataset.summary(cfg)
    assert (summary["holdout_images"], summary[attrs.HOLDOUT_SCORED], summary[attrs.HOLDOUT_COPIES]) == (7, 6, 1)
    assert summary[attrs.HOLDOUT_COPY_FILES] == [[dataset.cache.paths[copy], dataset.cache.paths[original]]]


def test_drawn_holdout_copy_of_a_pool_image_is_not_scored(tmp_path, make_dataset):
    root = make_dataset("pool", per_class=10, test_per_class=None)
    cfg = config(tmp_path, root, holdout_fraction=0.3)
    before = study_mod.decode_dataset(cfg, show_progress=False)
    pool, holdout = holdout_indices(before.cache, 0.3, cfg.data.split_seed)
    assert not len(before.holdout_rows(cfg).copies)  # generated images are all different
    paths = before.cache.paths
    # One holdout image becomes a copy of a pool image; two others become twins of each other,
    # which is no leak (the trials trained on neither). The draw depends on the labels only.
    overwrite(paths[pool[4]], paths[holdout[0]])
    overwrite(paths[holdout[2]], paths[holdout[1]])

    after = study_mod.decode_dataset(cfg, show_progress=False)
    rows = after.holdout_rows(cfg)
    assert rows.pool.tolist() == pool.tolist()
    assert rows.copies.tolist() == [holdout[0]] and rows.copy_of.tolist() == [pool[4]]
    assert rows.scored.tolist() == holdout[1:].tolist()
    assert after.summary(cfg)[attrs.HOLDOUT_COPIES] == 1


def test_second_run_hashes_nothing(tmp_path, leaky_split, forbid_hashing):
    cfg = config(tmp_path, leaky_split)
    first = study_mod.decode_dataset(cfg, show_progress=False).holdout_rows(cfg)
    recorded = json.loads((tmp_path / "cache" / hashes.HASHES_FILE).read_text())["files"]
    assert str(leaky_split / "test/class_1/copy.png") in recorded

    forbid_hashing()
    second = study_mod.decode_dataset(cfg, show_progress=False).holdout_rows(cfg)
    assert second.copies.tolist() == first.copies.tolist() and second.scored.tolist() == first.scored.tolist()


def test_a_changed_file_is_hashed_again(tmp_path, leaky_split):
    cfg = config(tmp_path, leaky_split)
    copy = leaky_split / "test/class_1/copy.png"
    assert len(study_mod.decode_dataset(cfg, show_progress=False).holdout_rows(cfg).copies) == 1
    overwrite(leaky_split / "train/class_2/img_000.png", copy)  # now a copy of another file
    dataset = study_mod.decode_dataset(cfg, show_progress=False)
    rows = dataset.holdout_rows(cfg)
    assert rows.copy_of.tolist() == [row_of(dataset, leaky_split / "train/class_2/img_000.png")]


def test_study_reuses_the_hashes_prepare_made(tmp_path, leaky_split, forbid_hashing):
    cfg = config(tmp_path, leaky_split)
    result = prepare(leaky_split, tmp_path / "prepared", cache_dir=cfg.data.cache_dir, show_progress=False)
    assert "train/test leak" in {p.path: p.reason for p in result.problems}[str(leaky_split / "test/class_1/copy.png")]

    forbid_hashing()
    for data_path in (leaky_split, result.manifest_path):  # the folders themselves, or prepare's manifest
        study_cfg = config(tmp_path, data_path)
        assert len(study_mod.decode_dataset(study_cfg, show_progress=False).holdout_rows(study_cfg).copies) == 1


def test_damaged_hash_cache_is_hashed_again(tmp_path, leaky_split):
    cfg = config(tmp_path, leaky_split)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / hashes.HASHES_FILE).write_text('{"version": 1, "files": {"x": [1, 2')
    rows = study_mod.decode_dataset(cfg, show_progress=False).holdout_rows(cfg)
    assert len(rows.copies) == 1
    assert json.loads((tmp_path / "cache" / hashes.HASHES_FILE).read_text())["version"] == hashes.HASHES_VERSION


def test_holdout_scores_and_report_leave_the_copy_out(tmp_path, leaky_split):
    cfg = config(tmp_path, leaky_split, study={"n_trials": 1, "report_top_k": 1})
    study = study_mod.run_study(cfg)
    detail = study_mod.score_holdout(study, cfg, study_mod.decode_dataset(cfg, show_progress=False))
    assert detail[attrs.HOLDOUT_SCORED] == int(np.sum(detail["confusion"])) == 6
    assert detail[attrs.HOLDOUT_COPIES] == 1

    page = report.build_report(cfg.study.storage, cfg.study.name).read_text()
    holdout = re.search(r'<section id="holdout">(.*?)</section>', page, re.S).group(1)
    assert "6 holdout images scored, 1 excluded as copies of training images" in holdout
    assert "copy.png" in holdout and "img_002.png" in holdout
    best = re.search(r'<section id="best-trials">(.*?)</section>', page, re.S).group(1)
    assert "holdout acc (never used to select)" in best
