"""Findings say only what the data supports: scripted studies (``optuna.trial.create_trial`` with
user attrs and a fake confirmation summary; nothing trains) with a flat truth and a clear one."""

from __future__ import annotations

import math
import re

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from transferstudy import report
from transferstudy.config import from_dict
from transferstudy.report import findings
from transferstudy.stats import Coefficient, mean_interval, regression
from transferstudy.study import attrs

DEPTHS = [0, 1, 2, 3]
DISTRIBUTIONS = {
    "unfreeze_depth": CategoricalDistribution(DEPTHS),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "epochs": IntDistribution(2, 16),
    "train_ratio": FloatDistribution(0.5, 0.9),
}
CONFIG = from_dict(
    {
        "study": {"name": "scripted"},
        "search": {"unfreeze_depth": DEPTHS, "lr": [1e-4, 1e-2], "epochs": [2, 16], "train_ratio": [0.5, 0.9]},
    }
).to_dict()


def truth_flat(params: dict) -> float:
    return 0.80


def truth_clear(params: dict) -> float:
    """Depth 2 is best by far; +3 points per +0.1 of the pool; +2 points per doubling of the epochs."""
    return (
        0.60
        + {0: 0.0, 1: 0.05, 2: 0.15, 3: 0.05}[params["unfreeze_depth"]]
        + 0.3 * (params["train_ratio"] - 0.5)
        + 0.02 * math.log2(params["epochs"] / 2)
    )


def scripted_study(
    truth,
    noise: float,
    n_trials: int = 24,
    seed: int = 0,
    depth_means: dict | None = None,
    seed_sd: float = 0.01,
    sweep: dict | None = None,
) -> report.StudyData:
    """Trials whose common-subset score is ``truth + noise``, and a confirmation summary of 3 seeds
    per depth around ``depth_means``."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction="maximize")
    for i in range(n_trials):
        params = {
            "unfreeze_depth": DEPTHS[i % len(DEPTHS)],
            "lr": float(10 ** rng.uniform(-4, -2)),
            "epochs": int(rng.integers(2, 17)),
            "train_ratio": float(rng.uniform(0.5, 0.9)),
        }
        common = truth(params) + float(rng.normal(0, noise))
        own = common + float(rng.normal(0, 0.03))  # its own validation split: other images
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                value=own,
                params=params,
                distributions=DISTRIBUTIONS,
                user_attrs={
                    attrs.TRIAL_COMMON_VAL: common,
                    attrs.TRIAL_VAL_ACCURACY: own,
                    attrs.TRIAL_BEST_EPOCH: 1,
                    attrs.TRIAL_HISTORY: [{"epoch": 1, "val_acc": own}],
                },
            )
        )
    means = depth_means or dict.fromkeys(DEPTHS, 0.8)
    groups = [
        {
            "depth": d,
            "source_trial": d,
            "params": {},
            "search_value": m,
            "metric": mean_interval(list(m + rng.normal(0, seed_sd, 3))),
            "holdout_accuracy": mean_interval(list(m - 0.02 + rng.normal(0, seed_sd, 3))),
        }
        for d, m in means.items()
    ]
    study.set_user_attr(attrs.STUDY_CONFIG, CONFIG)
    study.set_user_attr(attrs.STUDY_COMMON_SUBSET, {"train_ratio": 0.9, "rows": 180, "metric": "val_accuracy"})
    study.set_user_attr(
        attrs.STUDY_CONFIRM,
        {
            "metric": "val_accuracy",
            "seeds": [1, 2, 3],
            "train_ratio": 0.9,
            "common_rows": 180,
            "holdout_rows": 400,
            "depths": groups,
            "missing_depths": [],
            "sweep": sweep,
            "runs": {"planned": 12, "complete": 12, "failed": 0},
        },
    )
    return report.load_data(study)


def sweep_of(gain_per_tenth: float, seed_sd: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    points = [
        {
            "train_ratio": r,
            "metric": mean_interval(list(0.7 + gain_per_tenth * 10 * (r - 0.5) + rng.normal(0, seed_sd, 3))),
            "holdout_accuracy": mean_interval([0.7, 0.71, 0.72]),
        }
        for r in (0.5, 0.7, 0.9)
    ]
    return {"depth": 2, "source_trial": 0, "params": {}, "common_ratio": 0.9, "common_rows": 180, "points": points}


def claims(data: report.StudyData) -> list[str]:
    return [findings.depth_finding(data), findings.data_finding(data), findings.epochs_finding(data)]


def test_flat_truth_names_no_winner():
    data = scripted_study(truth_flat, noise=0.03, sweep=sweep_of(0.0, seed_sd=0.03))
    depth, ratio, epochs = claims(data)
    assert "not separable" in depth and "is best" not in depth
    for d in DEPTHS:  # every depth with its interval and n
        assert re.search(rf"depth {d}: 0\.\d{{3}} \(95% CI 0\.\d{{3}}–0\.\d{{3}}, n=3 seeds\)", depth)
    assert "<b>no evidence</b>" in ratio and "(95% CI" in ratio and "n=9" in ratio  # 3 ratios x 3 seeds
    assert "<b>no evidence</b>" in epochs and "n=24" in epochs
    for text in (ratio, epochs):
        assert "<b>helped</b>" not in text and "<b>hurt</b>" not in text and "did not help" not in text


def test_clear_truth_names_the_best_depth_and_the_trends():
    data = scripted_study(truth_clear, noise=0.005, depth_means={0: 0.70, 1: 0.78, 2: 0.88, 3: 0.79}, seed_sd=0.005)
    depth, ratio, epochs = claims(data)
    assert "Depth <b>2</b> is best" in depth and "not separable" not in depth
    # No sweep: the trends come from the search, adjusted for the other searched dimensions.
    assert "more training data <b>helped</b> (by at least a useful gain)" in ratio and "per +0.1 of the pool" in ratio
    assert "unfreeze_depth" in ratio and "epochs" in ratio and "n=24" in ratio
    assert "<b>helped</b>" in epochs and "per doubling of the epochs" in epochs
    estimate = float(re.search(r"([+-]\d+\.\d) points per \+0\.1", ratio).group(1))
    assert estimate == pytest.approx(3.0, abs=0.5)  # the truth: +3 points per +0.1


def test_a_sweep_with_a_clear_gain_says_so_and_overlap_below_the_top_still_names_it():
    data = scripted_study(
        truth_flat,
        noise=0.03,
        depth_means={0: 0.70, 1: 0.71, 2: 0.85, 3: 0.72},
        seed_sd=0.005,
        sweep=sweep_of(0.03, seed_sd=0.003),
    )
    depth, ratio, _ = claims(data)
    assert "Depth <b>2</b> is best" in depth  # 0, 1 and 3 overlap each other, all lie below 2
    assert "confirmation sweep" in ratio and "<b>helped</b>" in ratio


def test_did_not_help_only_when_the_interval_excludes_a_useful_gain():
    assert "did not help" in findings.trend_verdict(Coefficient(0.001, -0.004, 0.006, 40))
    assert "no evidence" in findings.trend_verdict(Coefficient(0.001, -0.02, 0.022, 8))
    assert "hurt" in findings.trend_verdict(Coefficient(-0.03, -0.05, -0.01, 40))
    assert "by less than a useful gain" in findings.trend_verdict(Coefficient(0.005, 0.002, 0.008, 400))
    assert findings.USEFUL_GAIN == 0.01


def test_separation_needs_intervals_that_do_not_overlap():
    def group(depth, lo, mean, hi, n=3):
        return {"depth": depth, "metric": {"n": n, "mean": mean, "lo": lo, "hi": hi}}

    best, tied = findings.separate([group(1, 0.78, 0.81, 0.84), group(2, 0.80, 0.82, 0.85), group(3, 0.60, 0.62, 0.64)])
    assert best is None and sorted(g["depth"] for g in tied) == [1, 2]
    verdict = findings.confirmation_verdict([group(1, 0.78, 0.81, 0.84), group(2, 0.80, 0.82, 0.85)], "depth")
    assert "depths 1 and 2 are <b>not separable</b>" in verdict
    lone = group(2, None, 0.95, None, n=1)  # n = 1: no interval, so nothing is separable from it
    assert findings.separate([lone, group(1, 0.5, 0.55, 0.6)])[0] is None


def test_depths_searched_but_not_confirmed_are_named():
    data = scripted_study(truth_clear, noise=0.005, depth_means={0: 0.70, 2: 0.88}, seed_sd=0.005)
    data.attrs[attrs.STUDY_CONFIRM]["searched_depths"] = [0, 1, 2, 3]
    assert "Depths 1 and 3 were searched but not confirmed" in findings.depth_finding(data)


def test_without_confirmation_no_depth_is_named():
    data = scripted_study(truth_clear, noise=0.005)
    data.attrs.pop(attrs.STUDY_CONFIRM)
    text = findings.depth_finding(data)
    assert "no evidence" in text and "No depth is named" in text and "depth 2: 6 trial(s)" in text


def test_regression_recovers_coefficients_with_intervals():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 50)
    fit = regression(np.column_stack([np.ones(50), x]), 1.0 + 2.0 * x + rng.normal(0, 0.01, 50))
    assert fit[1].lo < 2.0 < fit[1].hi and fit[1].hi - fit[1].lo < 0.05 and fit[1].n == 50
    assert regression(np.ones((3, 2)), np.ones(3)) is None  # collinear: not estimable
    assert mean_interval([0.5])["lo"] is None and mean_interval([0.5, 0.7])["lo"] < 0.5
    assert mean_interval([0.1, 0.9], bounds=(0.0, 1.0))["lo"] == 0.0  # a score has no mean below 0


def test_report_shows_the_confirmation_section():
    data = scripted_study(truth_flat, noise=0.03, sweep=sweep_of(0.0, seed_sd=0.03))
    page = report.render(data)
    section = re.search(r'<section id="confirmation">(.*?)</section>', page, re.S).group(1)
    assert 'href="#confirmation"' in page and "Depth (confirmation)" in page
    assert re.findall(r'data-figure="([^"]+)"', section) == ["confirmation", "confirmation-sweep"]
    assert "<b>not separable</b>" in section and "95% interval" in section
    verdict = re.search(r'<p id="depth-verdict">(.*?)</p>', section).group(1)
    assert re.sub(r"</?b>", "", verdict).count("<") == 0  # plain text around our own markup
    best = re.search(r'<section id="best-trials">(.*?)</section>', page, re.S).group(1)
    assert "on common subset (ranks)" in best and "180 images" in best and "never used to select" in best
