"""The few statistics the study's answers rest on: a mean with its t interval, and a linear
regression with an interval per coefficient. Plain numpy/scipy, no Optuna, no torch.

    >>> mean_interval([0.80, 0.82, 0.81])   # {"n": 3, "mean": 0.81, "lo": 0.785..., "hi": 0.834..., ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

#: Every interval the project reports is two-sided 95%.
LEVEL = 0.95


def t_quantile(dof: int, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``dof`` degrees of freedom."""
    return float(sps.t.ppf(0.5 + level / 2, dof))


def mean_interval(
    values: list[float], level: float = LEVEL, bounds: tuple[float, float] = (-math.inf, math.inf)
) -> dict:
    """Mean of ``values`` (one per seed) and its t interval: ``{"n", "mean", "lo", "hi", "values"}``.

    The interval is ``mean +- t(n - 1) x sd / sqrt(n)``, cut to ``bounds`` (a score in [0, 1] has
    no mean outside them); with fewer than two values it is unknown (``lo`` and ``hi`` None), and
    so is everything with no value at all (``mean`` None).
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else None
    if n < 2:
        return {"n": n, "mean": mean, "lo": None, "hi": None, "values": x.tolist()}
    half = t_quantile(n - 1, level) * float(x.std(ddof=1)) / math.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "lo": max(bounds[0], mean - half),
        "hi": min(bounds[1], mean + half),
        "values": x.tolist(),
    }


def has_interval(summary: dict | None) -> bool:
    return bool(summary) and summary.get("lo") is not None and summary.get("hi") is not None


def above(a: dict, b: dict) -> bool:
    """Whether interval ``a`` lies wholly above interval ``b`` (both known): the two are separable."""
    return has_interval(a) and has_interval(b) and a["lo"] > b["hi"]


@dataclass(frozen=True)
class Coefficient:
    """One regression coefficient: estimate, its 95% interval, and the observations behind it."""

    estimate: float
    lo: float
    hi: float
    n: int


def regression(X: np.ndarray, y: np.ndarray, level: float = LEVEL) -> list[Coefficient] | None:
    """Ordinary least squares of ``y`` on the columns of ``X`` (include a column of ones for an
    intercept), with a t interval per coefficient; None when the data cannot estimate them all
    (no residual degrees of freedom, or collinear columns)."""
    n, p = X.shape
    dof = n - p
    if dof < 1 or np.linalg.matrix_rank(X) < p:
        return None
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    residual = y - X @ coef
    sigma2 = float(residual @ residual) / dof
    se = np.sqrt(np.maximum(np.diag(np.linalg.inv(X.T @ X)) * sigma2, 0.0))
    t = t_quantile(dof, level)
    return [Coefficient(float(b), float(b - t * s), float(b + t * s), n) for b, s in zip(coef, se)]
