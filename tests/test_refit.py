"""The refit model: the best trial's configuration trained on the whole pool, scored once on the
holdout, exported, not trained twice, and shown in the report's model card and headline."""

from __future__ import annotations

import contextlib
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers import tiny_config

from transferstudy import export, report
from transferstudy import study as study_mod
from transferstudy import trial as trial_mod
from transferstudy.config import StudyConfig
from transferstudy.model import build_model, load_checkpoint
from transferstudy.splits import holdout_indices
from transferstudy.study import refit as refit_mod


@dataclass
class Refitted:
    cfg: StudyConfig
    study: optuna.Study
    dataset: study_mod.DecodedData
    summary: dict
    fit_rows: tuple[np.ndarray, np.ndarray]  # (train, val) rows the refit's fit() was given
    root: Path


@pytest.fixture(scope="module")
def refitted(tmp_path_factory) -> Refitted:
    """A 2-trial tiny study, its holdout scores and its refit (flip TTA), once for the module."""
    root = tmp_path_factory.mktemp("refit")
    cfg = tiny_config(root).with_overrides(refit={"enabled": True, "tta": "flip", "seed": 3})
    here = Path.cwd()
    os.chdir(root)  # the demo digits are written under ./studies/data
    try:
        dataset = study_mod.decode_dataset(cfg, show_progress=False)
        study = study_mod.run_study(cfg, dataset)
        study_mod.score_holdout(study, cfg, dataset)
        seen = []
        real_fit = trial_mod.fit

        def spy(model, data, train, val, *args, **kwargs):
            seen.append((train, val))
            return real_fit(model, data, train, val, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trial_mod, "fit", spy)
            summary = study_mod.refit_best(study, cfg, dataset)
    finally:
        os.chdir(here)
    return Refitted(cfg, study, dataset, summary, seen[0], root)


def _no_training(*args, **kwargs):
    raise AssertionError("the refit trained again")


def test_refit_trains_best_settings_on_the_whole_pool(refitted):
    r = refitted
    pool, holdout = holdout_indices(r.dataset.cache, r.cfg.data.holdout_fraction, r.cfg.data.split_seed)
    train, val = r.fit_rows
    assert np.array_equal(np.sort(train), pool) and len(val) == 0  # train + validation, nothing held back to pick with
    assert not set(train) & set(holdout) and len(pool) + len(holdout) == len(r.dataset.cache)
    best = study_mod.top_trials(r.study, 1)[0]  # the best trial, ranked on the common validation subset
    assert r.summary["train_samples"] == len(pool) == r.dataset.summary(r.cfg)["pool_images"]
    assert r.summary["trial"] == best.number and r.summary["params"] == best.params
    assert r.summary["epochs"] == best.params["epochs"] and r.summary["seed"] == 3
    assert r.summary["unfreeze_depth"] == best.params["unfreeze_depth"] and r.summary["trainable"][-1] == "head"
    assert r.summary["search"]["val_accuracy"] == best.user_attrs["val_accuracy"]
    assert r.summary["train_seconds"] > 0 and r.summary["seconds"] >= r.summary["train_seconds"]


def test_holdout_scores_are_stored_with_an_interval(refitted):
    stored = refitted.study.user_attrs["refit"]
    assert stored == json.loads(json.dumps(refitted.summary))  # what the call returned is what the study keeps
    scored = refitted.dataset.holdout_rows(refitted.cfg).scored  # the holdout less copies of training images
    for scores in (stored["holdout"], stored["holdout_tta"]):
        assert scores["n"] == len(scored) > 0 and scores["hits"] == round(scores["accuracy"] * len(scored))
        lo, hi = scores["accuracy_ci95"]
        assert 0.0 <= lo <= scores["accuracy"] <= hi <= 1.0
        assert 0.0 <= scores["macro_f1"] <= 1.0 and scores["accuracy"] <= scores["top5"] <= 1.0
    wrong = len(scored) - stored["holdout"]["hits"]
    assert sum(p["count"] for p in stored["confused_pairs"]) <= wrong
    weakest = stored["weakest_classes"]
    assert len(weakest) <= refit_mod.KNOWN_WEAKNESSES and bool(weakest) == bool(wrong)
    assert all(w["recall"] < 1.0 for w in weakest) and [w["recall"] for w in weakest] == sorted(
        w["recall"] for w in weakest
    )


def test_model_folder_is_exported_with_its_description(refitted):
    pytest.importorskip("onnx")
    folder = refitted.root / "tiny" / "model"
    assert refitted.summary["model_dir"] == str(folder) and refitted.summary["exported"]
    assert sorted(Path(f).name for f in refitted.summary["files"]) == ["model.json", "model.onnx", "model.pt2"]
    doc = export.read_model_json(folder)
    assert doc["class_names"] == refitted.dataset.cache.class_names
    assert doc["meta"]["study"] == "tiny" and doc["meta"]["trial"] == refitted.summary["trial"]
    assert doc["meta"]["train_samples"] == refitted.summary["train_samples"]
    assert doc["meta"]["holdout"]["accuracy"] == refitted.summary["holdout"]["accuracy"]
    stored = refitted.study.user_attrs["files"]  # one copy on disk: each file is its artifact too
    for name in ("model.json", "model.onnx", "model.pt2"):
        assert os.path.samefile(folder / name, refitted.root / "tiny" / "artifacts" / stored[f"model/{name}"])
    check = refitted.summary["export_check"]
    if check is not None:  # onnxruntime installed
        assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-3


def test_resumed_study_does_not_refit_twice(refitted, monkeypatch):
    monkeypatch.setattr(trial_mod.TrialRunner, "run_trial", _no_training)
    again = study_mod.refit_best(refitted.study, refitted.cfg, refitted.dataset)
    assert again == refitted.study.user_attrs["refit"]
    # Another [refit] seed is another model: it trains again.
    with pytest.raises(AssertionError, match="trained again"):
        study_mod.refit_best(refitted.study, refitted.cfg.with_overrides(refit={"seed": 4}), refitted.dataset)


def test_disabled_refit_is_skipped(refitted, monkeypatch):
    monkeypatch.setattr(trial_mod.TrialRunner, "run_trial", _no_training)
    off = refitted.cfg.with_overrides(refit={"enabled": False})
    assert study_mod.refit_best(refitted.study, off, refitted.dataset) is None


def test_report_headline_and_model_card(refitted, tmp_path):
    page = report.build_report(refitted.cfg.study.storage, "tiny", out=tmp_path / "report.html").read_text()
    assert 'href="#model-card"' in page
    header = re.search(r'<section id="header">(.*?)</section>', page, re.S).group(1)
    hold = refitted.summary["holdout"]
    lo, hi = hold["accuracy_ci95"]
    headline = re.search(r'<p class="headline" id="refit-headline">(.*?)</p>', header, re.S).group(1)
    interval = f"95% CI {lo:.1%}".rstrip("%") + f"–{hi:.1%}"
    assert f"Refit model: holdout accuracy <b>{hold['accuracy']:.1%} ({interval}, {hold['n']} images)</b>" in headline
    assert f"trained on {refitted.summary['train_samples']} pool images; search validation best" in headline
    assert "with flip TTA" in headline
    card = html.unescape(re.search(r'<section id="model-card">(.*?)</section>', page, re.S).group(1))
    for text in (
        "ResNet-50 with a new 10-way linear head",
        "What it was trained on",
        "Known weaknesses",
        "with flip TTA",
        f"python -m transferstudy.predict {refitted.summary['model_dir']} some.jpg",
        "onnxruntime",
    ):
        assert text in card


def test_model_card_snippet_runs(refitted):
    pytest.importorskip("onnxruntime")
    page = report.render(report.load_data(refitted.study))
    snippet = html.unescape(re.search(r"<pre><code>(import json.*?)</code></pre>", page, re.S).group(1))
    image = str(refitted.root / refitted.dataset.cache.paths[0])  # paths may be relative to the study's folder
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(snippet.replace("some.jpg", image), {})  # noqa: S102 -- the card's own code, on one of the study's images
    assert out.getvalue().strip() in refitted.dataset.cache.class_names


def test_without_the_export_extra_a_checkpoint_is_saved(refitted, tmp_path, monkeypatch, caplog):
    def unavailable(*args, **kwargs):
        raise export.ExportUnavailableError(f"onnx is not installed; {export.INSTALL_HINT}")

    monkeypatch.setattr(export, "export_model", unavailable)
    model, _ = build_model(10, "none", 0)
    saved = refit_mod.save_model(model, refitted.dataset.cache, tmp_path, {"trial": 0}, np.zeros(0, np.int64))
    assert saved["exported"] is False and saved["files"] == [str(tmp_path / refit_mod.FALLBACK_CHECKPOINT)]
    assert "not exported" in caplog.text and export.INSTALL_HINT in saved["export_warning"]
    _, meta = load_checkpoint(saved["files"][0])
    assert meta["class_names"] == refitted.dataset.cache.class_names and meta["extra"] == {"trial": 0}
    # Once the extra is installed, the next run refits to export.
    previous = {"trial": 0, "key": "k", **saved}
    monkeypatch.setattr(refit_mod, "can_export", lambda: True)
    assert not refit_mod.up_to_date(previous, 0, "k")
    monkeypatch.setattr(refit_mod, "can_export", lambda: False)
    assert refit_mod.up_to_date(previous, 0, "k") and not refit_mod.up_to_date(previous, 1, "k")


def test_wilson_interval():
    lo, hi = refit_mod.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert refit_mod.wilson_interval(0, 10)[0] == 0.0 and refit_mod.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in refit_mod.wilson_interval(0, 0))
