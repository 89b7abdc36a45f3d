"""Findings: sentences computed from the trials (pure functions of ``StudyData``; no plotly)."""

from __future__ import annotations

import math

import numpy as np
from optuna.trial import TrialState

from ..study import attrs as stored
from ..study.attrs import fmt_param
from .html import fmt_duration, fmt_pct, missing
from .load import StudyData


def least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """(slope, intercept, R²) of a straight-line fit, or None with too few distinct points."""
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 0.0
    return float(slope), float(intercept), r2


def depth_finding(data: StudyData) -> str:
    best: dict = {}
    for t in data.complete:
        d = data.param(t, "unfreeze_depth")
        best[d] = max(best.get(d, -math.inf), t.value)
    if not best:
        return "Unfreeze depth: no complete trial yet."
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    counts = {d: sum(1 for t in data.complete if data.param(t, "unfreeze_depth") == d) for d in best}
    if len(ranked) == 1:
        d, v = ranked[0]
        return f"Unfreeze depth: only depth {d} has complete trials ({counts[d]}, best {data.objective} {v:.4f}); no comparison possible."
    (d1, v1), (d2, v2) = ranked[:2]
    if v1 == v2:
        tied = [str(d) for d, v in ranked if v == v1]
        return f"Unfreeze depth: depths {', '.join(tied)} tied at {data.objective} {v1:.4f}; the trials do not separate them."
    return (
        f"Unfreeze depth: depth <b>{d1}</b> did best ({data.objective} {v1:.4f}, best of {counts[d1]} trial(s)), "
        f"{v1 - v2:+.4f} ({(v1 - v2) * 100:+.1f} points) over the runner-up depth {d2} ({v2:.4f}, best of {counts[d2]})."
    )


def data_finding(data: StudyData) -> str:
    trials = data.complete
    x = np.array([data.param(t, "train_ratio") or np.nan for t in trials], dtype=float)
    y = np.array([t.value for t in trials], dtype=float)
    keep = np.isfinite(x)
    fit = least_squares(x[keep], y[keep])
    if fit is None:
        return f"Training data: not enough complete trials with different train_ratio to fit a trend ({int(keep.sum())})."
    slope, _, r2 = fit
    verdict = "made no measurable difference" if abs(slope) < 0.005 else ("helped" if slope > 0 else "did not help")
    strength = "weak evidence" if r2 < 0.1 else ("moderate evidence" if r2 < 0.5 else "clear trend")
    return (
        f"Training data: more training data <b>{verdict}</b>: the least-squares slope of {data.objective} over "
        f"train_ratio is {slope:+.3f} per unit, i.e. {slope * 10:+.1f} points per +0.1 of the pool "
        f"({int(keep.sum())} trials, R² {r2:.2f}: {strength}). A larger train_ratio also leaves a smaller, noisier validation split."
    )


def rate_finding(data: StudyData) -> str:
    ranked = sorted(data.complete, key=lambda t: -t.value)
    rates = [data.param(t, "lr") for t in ranked[: max(1, len(ranked) // 4)]]
    rates = [r for r in rates if isinstance(r, (int, float))]
    if not rates:
        return "Learning rate: no complete trial yet."
    return f"Learning rate: the best {len(rates)} trial(s) used lr between {min(rates):.2e} and {max(rates):.2e} (best trial: {rates[0]:.2e})."


def epochs_finding(data: StudyData) -> str:
    if not data.top:
        return "Epochs: no complete trial yet."
    t = data.top[0]
    planned, run = data.param(t, "epochs"), len(t.user_attrs.get(stored.TRIAL_HISTORY, []))
    best_epoch = t.user_attrs.get(stored.TRIAL_BEST_EPOCH)
    peak = f"; its validation score peaked at epoch {best_epoch}" if best_epoch else ""
    hint = " (later epochs did not improve it: fewer epochs would do)" if best_epoch and best_epoch < run else ""
    return f"Epochs: the best trial trained {run} of {planned} planned epoch(s){peak}{hint}."


def pruning_finding(data: StudyData) -> str:
    """Time saved by pruning: (planned - run) epochs x that trial's mean epoch time, summed."""
    total = sum(float(t.user_attrs.get(stored.TRIAL_TRAIN_SECONDS) or 0.0) for t in data.trials)
    saved, count = 0.0, 0
    for t in data.of_state(TrialState.PRUNED):
        history = t.user_attrs.get(stored.TRIAL_HISTORY) or []
        planned = data.param(t, "epochs")
        if not history or not isinstance(planned, int):
            continue
        per_epoch = float(np.mean([h.get("seconds", 0.0) for h in history]))
        saved += max(0, planned - len(history)) * per_epoch
        count += 1
    if count == 0:
        return f"Pruning: no trial was pruned ({fmt_duration(total)} of training in all)."
    share = saved / total if total else 0.0
    return (
        f"Pruning: {count} pruned trial(s) saved an estimated <b>{fmt_duration(saved)}</b> of training, "
        f"against {fmt_duration(total)} actually spent ({share:.0%} more time without pruning)."
    )


def holdout_finding(data: StudyData) -> str | None:
    holdout = data.attrs.get(stored.STUDY_HOLDOUT)
    if not holdout:
        return None
    trial = next((t for t in data.trials if t.number == holdout.get("trial")), None)
    val = trial.user_attrs.get(stored.TRIAL_VAL_ACCURACY) if trial else None
    if missing(val) or missing(holdout.get("accuracy")):
        return None
    gap = holdout["accuracy"] - val
    return f"Holdout: trial #{trial.number} reached {fmt_pct(holdout['accuracy'])} holdout accuracy vs {fmt_pct(val)} on validation ({gap * 100:+.1f} points)."


def best_finding(data: StudyData) -> str:
    if not data.top:
        return "Best setting: no complete trial yet."
    t = data.top[0]
    params = ", ".join(f"{k} = {fmt_param(v)}" for k, v in t.params.items())
    return f"Best setting: trial #{t.number} with {params} reached {data.objective} <b>{t.value:.4f}</b>."
