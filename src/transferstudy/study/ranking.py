"""Which trial is best: ranked on the validation subset common to all trials (DESIGN decision 7).

Each trial validates on the part of the pool its own ``train_ratio`` leaves over, so trial values
at different ratios are scores on different images. Every complete trial also records the
objective's metric on the common subset (``attrs.TRIAL_COMMON_VAL``: the validation split of the
largest searched ratio, inside every trial's validation split), and trials are ranked on it. A
study with a trial that lacks it (one run before it existed) is ranked on trial values, all of
them: one ranking never mixes the two. The holdout never ranks anything.

Reads only what the study stores, so the report uses it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from optuna.trial import FrozenTrial

from . import attrs


def common_value(user_attrs: dict) -> float | None:
    """A trial's metric on the common validation subset, or None (not recorded, or no such rows)."""
    value = user_attrs.get(attrs.TRIAL_COMMON_VAL)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def on_common_subset(trials: Iterable[FrozenTrial]) -> bool:
    """Whether every one of ``trials`` has its common-subset metric (then they are ranked on it)."""
    return all(common_value(t.user_attrs) is not None for t in trials)


def ranking_value(value: float, user_attrs: dict, common: bool) -> float:
    """What a trial ranks by: its common-subset metric when ``common``, else its trial value."""
    return common_value(user_attrs) if common else value


def ranking_key(trials: list[FrozenTrial]) -> Callable[[FrozenTrial], float]:
    """The ranking value of each of ``trials`` (complete ones), one rule for all of them."""
    common = on_common_subset(trials)
    return lambda t: ranking_value(t.value, t.user_attrs, common)


def rank(trials: list[FrozenTrial], k: int | None = None) -> list[FrozenTrial]:
    """Complete ``trials`` best first (the earlier trial first on a tie), at most ``k``."""
    key = ranking_key(trials)
    return sorted(trials, key=lambda t: (-key(t), t.number))[:k]
