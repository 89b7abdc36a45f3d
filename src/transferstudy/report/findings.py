"""Findings: sentences computed from the trials (pure functions of ``StudyData``; no plotly).

A finding says only what the data supports (DESIGN decision 7): a claim carries n and a 95%
interval. The depth finding comes from the confirmation runs (``study.confirm``) and names a best
depth only when its interval lies above every other's; trends over train_ratio and epochs come
from the confirmation sweep or from a regression over the search with the other searched
dimensions as covariates, and "did not help" needs an interval that excludes ``USEFUL_GAIN``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
from optuna.trial import TrialState

from ..config import SEARCHABLE
from ..stats import Coefficient, above, has_interval, regression
from ..study import attrs as stored
from ..study.attrs import fmt_param
from .html import fmt_duration, fmt_pct, missing
from .load import StudyData

#: A gain worth having, in the objective's units: +1 point per +0.1 of the pool trained on, or per
#: doubling of the epochs. A trend finding says "did not help" only when its interval excludes it.
USEFUL_GAIN = 0.01
#: Trend findings: searched dimension -> (its values in the finding's unit, what one unit is).
TREND_UNITS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "train_ratio": (lambda x: 10.0 * x, "per +0.1 of the pool"),
    "epochs": (np.log2, "per doubling of the epochs"),
}


def interval_text(s: dict | None, unit: str = "seeds") -> str:
    """``0.812 (95% CI 0.785–0.839, n=3 seeds)``; without an interval, why not."""
    if not s or s.get("mean") is None:
        return "— (no complete run)"
    if not has_interval(s):
        return f"{s['mean']:.3f} (n={s['n']} {unit}: no interval)"
    return f"{s['mean']:.3f} (95% CI {s['lo']:.3f}–{s['hi']:.3f}, n={s['n']} {unit})"


def _names(items: list) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def separate(groups: list[dict], key: str = "metric") -> tuple[dict | None, list[dict]]:
    """(the group whose interval lies above every other's, or None; the groups not separable from
    the one with the highest mean, itself included). A group without an interval (n < 2)
    separates from nothing."""
    scored = [g for g in groups if (g.get(key) or {}).get("mean") is not None]
    if not scored:
        return None, []
    top = max(scored, key=lambda g: g[key]["mean"])
    tied = [g for g in scored if g is top or not above(top[key], g[key])]
    return (top if len(tied) == 1 and len(scored) > 1 else None), tied


def confirmation_verdict(groups: list[dict], label: str, key: str = "metric") -> str:
    """The claim the confirmation intervals support: a best one only when its interval is above
    every other's; else which ones are not separable."""
    best, tied = separate(groups, key)
    if len(tied) < 2 and best is None:
        return f"only {label} {tied[0][label]} was confirmed: no comparison" if tied else "no complete run"
    if best is not None:
        return f"{label} <b>{best[label]}</b> is best: its 95% interval lies above every other {label}'s"
    return (
        f"{label}s {_names(sorted(g[label] for g in tied))} are <b>not separable</b> (their 95% intervals "
        "overlap, or one run gives no interval): no best one is named"
    )


def depth_finding(data: StudyData) -> str:
    """From the confirmation runs (``study.confirm``); without them, no depth is named."""
    summary = data.attrs.get(stored.STUDY_CONFIRM) or {}
    groups = sorted(summary.get("depths") or [], key=lambda g: g["depth"])
    if not groups:
        counts = Counter(data.param(t, "unfreeze_depth") for t in data.complete)
        seen = "; ".join(f"depth {d}: {n} trial(s)" for d, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
        return (
            "Unfreeze depth: <b>no evidence</b> yet: no confirmation runs are stored (<code>[confirm]</code> off or not "
            f"run), and the best search trial of a depth is one selected run on its own split ({seen or 'no complete trial'}). "
            "No depth is named."
        )
    per_depth = "; ".join(f"depth {g['depth']}: {interval_text(g['metric'])}" for g in groups)
    verdict = confirmation_verdict(groups, "depth")
    return (
        f"Unfreeze depth (confirmation: the best setting of each depth retrained with {len(summary.get('seeds') or [])} "
        f"seeds at train_ratio {fmt_param(summary.get('train_ratio'))}, {summary.get('metric', data.objective)} on the "
        f"{summary.get('common_rows', '—')}-image common validation subset): {per_depth}. "
        + verdict[:1].upper()
        + verdict[1:]
        + "."
        + unconfirmed_text(summary, groups)
    )


def unconfirmed_text(summary: dict, groups: list[dict]) -> str:
    """The searched depths the comparison leaves out (``[confirm] depths``, or no complete search trial)."""
    left = sorted(set(summary.get("searched_depths") or []) - {g["depth"] for g in groups})
    if not left:
        return ""
    depths = f"Depth {left[0]} was" if len(left) == 1 else f"Depths {_names(left)} were"
    return f" {depths} searched but not confirmed: not compared here."


def regression_rows(data: StudyData) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """The complete trials as a regression design: (X with an intercept column, column names, y).

    y is what the trials are ranked by (the common-subset metric when every trial has it). Each
    searched dimension with more than one value seen is a covariate: ``TREND_UNITS`` in their
    unit, log-ranged ones as log10, choices as indicators (the first value seen is the baseline).
    """
    trials = data.complete
    if not trials:
        return None
    columns, names = [np.ones(len(trials))], ["intercept"]
    for dim in data.searched():
        values = [data.param(t, dim) for t in trials]
        levels = sorted(set(values), key=str)
        if len(levels) < 2 or any(v is None for v in values):
            continue
        kind = SEARCHABLE.get(dim, "choice")
        if dim in TREND_UNITS or kind in ("log", "float", "int"):
            x = np.asarray(values, dtype=float)
            columns.append(TREND_UNITS[dim][0](x) if dim in TREND_UNITS else np.log10(x) if kind == "log" else x)
            names.append(dim)
            continue
        for level in levels[1:]:
            columns.append(np.array([v == level for v in values], dtype=float))
            names.append(f"{dim}={level}")
    y = np.array([data.rank_value(t) for t in trials], dtype=float)
    return np.column_stack(columns), names, y


def trend_verdict(c: Coefficient, subject: str = "it") -> str:
    """What a coefficient's interval supports about ``subject`` ("more epochs"), against ``USEFUL_GAIN``."""
    if c.lo > 0:
        return f"{subject} <b>helped</b>" + (
            " (by at least a useful gain)"
            if c.lo >= USEFUL_GAIN
            else ", by less than a useful gain"
            if c.hi < USEFUL_GAIN
            else ""
        )
    if c.hi < 0:
        return f"{subject} <b>hurt</b>"
    if c.hi < USEFUL_GAIN:
        return f"{subject} <b>did not help</b> by a useful amount (the interval excludes a gain of +{100 * USEFUL_GAIN:g} point)"
    return f"<b>no evidence</b> whether {subject} helped (the interval holds both no change and a useful gain)"


def coefficient_text(c: Coefficient, unit: str) -> str:
    return f"{100 * c.estimate:+.1f} points {unit} (95% CI {100 * c.lo:+.1f} to {100 * c.hi:+.1f}, n={c.n})"


def search_trend(data: StudyData, dim: str, topic: str) -> str:
    """The effect of ``dim`` from the search: its coefficient in a regression over the complete
    trials with the other searched dimensions as covariates (never a line through one dimension)."""
    if dim not in data.searched():
        return f"{topic}: {dim} was not searched (fixed at {fmt_param(data.param(data.complete[0], dim)) if data.complete else '—'}); no claim."
    rows = regression_rows(data)
    fit = regression(rows[0], rows[2]) if rows else None
    if fit is None or dim not in rows[1]:
        n = len(data.complete)
        return (
            f"{topic}: {n} complete trial(s) are too few (or too alike) to estimate the effect of {dim} with the "
            "other searched dimensions as covariates; <b>no evidence</b> either way."
        )
    c = fit[rows[1].index(dim)]
    others = [name for name in rows[1][1:] if name != dim and not name.startswith(f"{dim}=")]
    where = (
        "on the common validation subset"
        if data.on_common_subset
        else "each on its own validation split (no common subset recorded)"
    )
    return (
        f"{topic}: {trend_verdict(c, 'more training data' if dim == 'train_ratio' else f'more {dim}')}: "
        f"{coefficient_text(c, TREND_UNITS[dim][1])}, from a regression of {data.objective} {where} over the complete "
        f"trials with {', '.join(sorted({o.split('=')[0] for o in others})) or 'no other dimension'} as covariates. "
        "Pruned trials have no final value and are not in it."
    )


def sweep_trend(sweep: dict, metric: str) -> str:
    """The effect of train_ratio from the confirmation sweep: each run is one point of a regression
    on the ratio, all scored on the same common subset."""
    points = [p for p in sweep.get("points") or [] if (p.get("metric") or {}).get("values")]
    x = np.array([p["train_ratio"] for p in points for _ in p["metric"]["values"]], dtype=float)
    y = np.array([v for p in points for v in p["metric"]["values"]], dtype=float)
    fit = regression(np.column_stack([np.ones(len(x)), 10.0 * x]), y) if len(points) >= 2 else None
    per_ratio = "; ".join(f"{fmt_param(p['train_ratio'])}: {interval_text(p['metric'])}" for p in points)
    if fit is None:
        return f"Training data (confirmation sweep): {per_ratio or 'no complete run'}; too few runs for a trend, <b>no evidence</b> either way."
    return (
        f"Training data (confirmation sweep: trial #{sweep.get('source_trial')}'s setting retrained at each train_ratio, "
        f"{metric} on the {sweep.get('common_rows', '—')}-image validation split of train_ratio "
        f"{fmt_param(sweep.get('common_ratio'))}, which no run trained on): {trend_verdict(fit[1], 'more training data')}: "
        f"{coefficient_text(fit[1], TREND_UNITS['train_ratio'][1])}. Per ratio: {per_ratio}."
    )


def data_finding(data: StudyData) -> str:
    summary = data.attrs.get(stored.STUDY_CONFIRM) or {}
    if summary.get("sweep"):
        return sweep_trend(summary["sweep"], summary.get("metric", data.objective))
    return search_trend(data, "train_ratio", "Training data")


def rate_finding(data: StudyData) -> str:
    ranked = sorted(data.complete, key=lambda t: (-data.rank_value(t), t.number))
    rates = [data.param(t, "lr") for t in ranked[: max(1, len(ranked) // 4)]]
    rates = [r for r in rates if isinstance(r, (int, float))]
    if not rates:
        return "Learning rate: no complete trial yet."
    return (
        f"Learning rate: the best {len(rates)} of {len(ranked)} complete trial(s) used lr between {min(rates):.2e} "
        f"and {max(rates):.2e} (best trial: {rates[0]:.2e}); a range the best runs shared, not a tested effect."
    )


def epochs_finding(data: StudyData) -> str:
    if not data.top:
        return "Epochs: no complete trial yet."
    t = data.top[0]
    planned, run = data.param(t, "epochs"), len(t.user_attrs.get(stored.TRIAL_HISTORY, []))
    best_epoch = t.user_attrs.get(stored.TRIAL_BEST_EPOCH)
    peak = f"; its validation score peaked at epoch {best_epoch}" if best_epoch else ""
    hint = " (one run: later epochs did not improve it)" if best_epoch and best_epoch < run else ""
    trend = search_trend(data, "epochs", "Epochs").removeprefix("Epochs: ")
    return f"Epochs: {trend} The best trial trained {run} of {planned} planned epoch(s){peak}{hint}."


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
    n = holdout.get(stored.HOLDOUT_SCORED, "—")
    return (
        f"Holdout: trial #{trial.number} reached {fmt_pct(holdout['accuracy'])} holdout accuracy (n={n} images) vs "
        f"{fmt_pct(val)} on its validation split ({gap * 100:+.1f} points)."
    )


def best_finding(data: StudyData) -> str:
    if not data.top:
        return "Best setting: no complete trial yet."
    t = data.top[0]
    params = ", ".join(f"{k} = {fmt_param(v)}" for k, v in t.params.items())
    if not data.on_common_subset:
        return (
            f"Best setting: trial #{t.number} with {params} reached {data.objective} <b>{t.value:.4f}</b> on its "
            f"validation split (best of {len(data.complete)} complete trials: one selected run, so optimistic)."
        )
    rows = (data.attrs.get(stored.STUDY_COMMON_SUBSET) or {}).get("rows", "—")
    return (
        f"Best setting: trial #{t.number} with {params} reached {data.objective} <b>{data.rank_value(t):.4f}</b> on the "
        f"common validation subset (n={rows} images; {t.value:.4f} on its own validation split), the best of "
        f"{len(data.complete)} complete trials: one selected run, so optimistic."
    )
