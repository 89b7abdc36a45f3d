"""The confirmation stage and ranking on common ground: the common validation subset, the best
trials ranked on it, and the best setting of each depth retrained with several seeds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from helpers import tiny_config
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from transferstudy import study as study_mod
from transferstudy import trial as trial_mod
from transferstudy.config import StudyConfig
from transferstudy.splits import common_validation, holdout_indices, make_splits
from transferstudy.stats import mean_interval
from transferstudy.study import attrs, ranking


class FakeCache:
    """What the split functions read from an ``ImageCache``: labels, and which images are test/."""

    def __init__(self, labels: np.ndarray, test: np.ndarray | None = None):
        self.labels = labels
        self.splits = np.where(test if test is not None else np.zeros(len(labels), bool), "test", "train")

    def __len__(self) -> int:
        return len(self.labels)


def test_common_subset_lies_inside_every_trials_validation_split():
    rng = np.random.default_rng(0)
    for case in range(40):
        sizes = rng.integers(1, 30, size=rng.integers(2, 12))  # classes of 1 image too
        labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        test = rng.random(len(labels)) < 0.2 if case % 4 == 0 else None  # a test/ folder, or a drawn holdout
        cache = FakeCache(labels, test)
        fraction, seed = float(rng.choice([0.0, 0.1, 0.2, 0.3])), int(rng.integers(0, 1000))
        largest = float(rng.uniform(0.3, 0.99))
        common = common_validation(cache, largest, fraction, seed)
        _, holdout = holdout_indices(cache, fraction, seed)
        assert not np.intersect1d(common, holdout).size
        for ratio in [*rng.uniform(0.01, largest, size=8), largest]:
            split = make_splits(cache, float(ratio), fraction, seed)
            assert np.isin(common, split.val).all(), (case, ratio)  # inside every validation split...
            assert not np.intersect1d(common, split.train).size  # ...so no trial trains on it


# --------------------------------------------------------------------------- ranking

DISTRIBUTIONS = {"unfreeze_depth": CategoricalDistribution([0, 1, 2]), "train_ratio": FloatDistribution(0.5, 0.9)}


def scripted_trial(depth: int, ratio: float, value: float, common: float | None) -> optuna.trial.FrozenTrial:
    user_attrs = {attrs.TRIAL_VAL_ACCURACY: value} | ({} if common is None else {attrs.TRIAL_COMMON_VAL: common})
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params={"unfreeze_depth": depth, "train_ratio": ratio},
        distributions=DISTRIBUTIONS,
        user_attrs=user_attrs,
    )


def test_best_trials_are_ranked_on_the_common_subset_and_old_studies_on_their_values():
    study = optuna.create_study(direction="maximize")
    # Trial 0 is best on its own (small, easy) validation split, trial 1 on the images all share.
    study.add_trials(
        [scripted_trial(0, 0.9, 0.95, 0.70), scripted_trial(1, 0.5, 0.80, 0.85), scripted_trial(2, 0.7, 0.60, 0.60)]
    )
    assert [t.number for t in study_mod.top_trials(study, 3)] == [1, 0, 2]
    old = optuna.create_study(direction="maximize")  # one trial without the common score: values rank, all of them
    old.add_trials([scripted_trial(0, 0.9, 0.95, 0.70), scripted_trial(1, 0.5, 0.80, None)])
    assert [t.number for t in study_mod.top_trials(old, 2)] == [0, 1]
    assert not ranking.on_common_subset(old.trials)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo digits are written under ./studies/data


def test_objective_scores_the_common_subset_like_its_own_validation(tmp_path):
    cfg = tiny_config(tmp_path, search={"epochs": [1, 1]})
    objective = study_mod.Objective(cfg, study_mod.decode_dataset(cfg, show_progress=False), torch.device("cpu"))
    # At the largest searched ratio the validation split is the common subset: the same number, exactly.
    trial = optuna.trial.FixedTrial({"unfreeze_depth": 1, "lr": 3e-3, "epochs": 1, "train_ratio": 0.8})
    objective(trial)
    assert trial.user_attrs[attrs.TRIAL_COMMON_VAL] == trial.user_attrs[attrs.TRIAL_VAL_ACCURACY]
    assert objective.common_subset == {
        "train_ratio": 0.8,
        "rows": trial.user_attrs["split_sizes"]["val"],
        "metric": "val_accuracy",
    }


# --------------------------------------------------------------------------- the confirmation stage


@dataclass
class Confirmed:
    cfg: StudyConfig
    study: optuna.Study
    dataset: study_mod.DecodedData
    summary: dict
    fits: list[tuple[np.ndarray, np.ndarray]]  # (train, val) rows of each confirmation run's fit


def _spy_fits(monkeypatch) -> list:
    seen, real_fit = [], trial_mod.fit

    def spy(model, data, train, val, *args, **kwargs):
        seen.append((train, val))
        return real_fit(model, data, train, val, *args, **kwargs)

    monkeypatch.setattr(trial_mod, "fit", spy)
    return seen


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory) -> Confirmed:
    """A 2-trial tiny search (depths 0 and 1, one epoch) and its confirmation with 2 seeds."""
    root = tmp_path_factory.mktemp("confirm")
    cfg = tiny_config(root, search={"epochs": [1, 1]}, confirm={"enabled": True, "seeds": 2})
    here = Path.cwd()
    os.chdir(root)
    try:
        dataset = study_mod.decode_dataset(cfg, show_progress=False)
        study = study_mod.run_study(cfg, dataset)
        with pytest.MonkeyPatch.context() as mp:
            fits = _spy_fits(mp)
            summary = study_mod.confirm_study(study, cfg, dataset)
    finally:
        os.chdir(here)
    return Confirmed(cfg, study, dataset, summary, fits)


def test_confirmation_stores_n_and_intervals_per_depth(confirmed):
    c = confirmed
    assert c.study.user_attrs[attrs.STUDY_CONFIRM] == c.summary
    assert [g["depth"] for g in c.summary["depths"]] == [0, 1] and c.summary["seeds"] == [1, 2]  # train_seed 0 + 1, + 2
    ranked = ranking.rank(c.study.get_trials(states=(TrialState.COMPLETE,)))
    best_of = {d: next(t.number for t in ranked if t.params["unfreeze_depth"] == d) for d in (0, 1)}
    for group in c.summary["depths"]:
        assert group["source_trial"] == best_of[group["depth"]]
        for key in ("metric", "holdout_accuracy"):
            s = group[key]
            assert s["n"] == 2 and s == mean_interval(s["values"], bounds=(0.0, 1.0))
            assert s["lo"] <= s["mean"] <= s["hi"]
    assert c.summary["runs"] == {"planned": 4, "complete": 4, "failed": 0}
    assert c.summary["holdout_rows"] == len(c.dataset.holdout_rows(c.cfg).scored)


def test_every_depth_trains_on_the_same_images_and_never_on_the_common_subset(confirmed):
    c = confirmed
    assert len(c.fits) == 4
    split = make_splits(
        c.dataset.cache, 0.8, c.cfg.data.holdout_fraction, c.cfg.data.split_seed
    )  # the largest searched
    for train, val in c.fits:
        assert np.array_equal(train, split.train) and np.array_equal(val, split.val)
    assert c.summary["train_ratio"] == 0.8 and c.summary["common_rows"] == len(split.val)
    runs = optuna.load_study(study_name="tiny-confirm", storage=c.cfg.study.storage).trials
    entries = sorted((t.user_attrs["confirm"]["depth"], t.user_attrs["confirm"]["seed"]) for t in runs)
    assert entries == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(t.params["train_ratio"] == 0.8 and t.state == TrialState.COMPLETE for t in runs)


def test_resumed_confirmation_trains_nothing_again(confirmed, monkeypatch):
    c = confirmed
    monkeypatch.chdir(c.cfg.result_dir.parent)
    monkeypatch.setattr(trial_mod.TrialRunner, "run_trial", _no_training)
    runs = lambda: len(optuna.load_study(study_name="tiny-confirm", storage=c.cfg.study.storage).trials)  # noqa: E731
    before = runs()
    assert study_mod.confirm_study(c.study, c.cfg, c.dataset) == c.summary
    assert runs() == before  # nothing enqueued, nothing trained


def _no_training(*args, **kwargs):
    raise AssertionError("a finished confirmation run was trained again")


def test_confirmation_is_off_when_disabled(confirmed):
    c = confirmed
    assert study_mod.confirm_study(c.study, c.cfg.with_overrides(confirm={"enabled": False}), c.dataset) is None


def test_learning_curve_sweep_scores_rows_no_run_trained_on(confirmed, monkeypatch):
    c = confirmed
    monkeypatch.chdir(c.cfg.result_dir.parent)
    fits = _spy_fits(monkeypatch)
    cfg = c.cfg.with_overrides(confirm={"seeds": 1, "train_ratios": [0.5, 0.9]})  # 0.9: beyond the searched 0.8
    summary = study_mod.confirm_study(c.study, cfg, c.dataset)
    assert len(fits) == 2  # resumed: only the sweep's two ratios train; seed 1 of each depth at 0.8 is there already
    common = make_splits(c.dataset.cache, 0.9, cfg.data.holdout_fraction, cfg.data.split_seed).val
    assert all(not np.intersect1d(train, common).size for train, _ in c.fits + fits)
    sweep = summary["sweep"]
    assert sweep["common_ratio"] == 0.9 and sweep["common_rows"] == len(common)
    assert [p["train_ratio"] for p in sweep["points"]] == [0.5, 0.9] and all(
        p["metric"]["n"] == 1 for p in sweep["points"]
    )
    assert sweep["source_trial"] == ranking.rank(c.study.get_trials(states=(TrialState.COMPLETE,)))[0].number
    runs = optuna.load_study(study_name="tiny-confirm", storage=cfg.study.storage).trials
    at_09 = [t for t in runs if t.user_attrs["confirm"]["train_ratio"] == 0.9]
    assert at_09 and all(
        t.user_attrs[attrs.TRIAL_COMMON_VAL] is None for t in at_09
    )  # it trained on part of 0.8's split
