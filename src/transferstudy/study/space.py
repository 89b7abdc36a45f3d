"""The search space: each trial's training settings, searched ones from Optuna, the rest from ``[train]``.

The kind of each searched key (log, float, int, choice) is ``config.SEARCHABLE``'s.
"""

from __future__ import annotations

import optuna

from ..config import SEARCHABLE, StudyConfig, TrainSection


def suggest(trial: optuna.trial.BaseTrial, cfg: StudyConfig) -> TrainSection:
    """All training settings of one trial: searched ones from Optuna, the rest from ``[train]``."""
    params = {}
    for key, spec in cfg.search.space.items():
        kind = SEARCHABLE[key]
        if kind == "choice":
            params[key] = trial.suggest_categorical(key, spec)
        elif kind == "int":
            params[key] = trial.suggest_int(key, spec[0], spec[1])
        else:
            params[key] = trial.suggest_float(key, spec[0], spec[1], log=kind == "log")
    return cfg.train.with_params(params)


def max_epochs(cfg: StudyConfig) -> int:
    """The most epochs any trial of the study can plan."""
    spec = cfg.search.space.get("epochs")
    return int(spec[1]) if spec else cfg.train.epochs


def largest_train_ratio(cfg: StudyConfig) -> float:
    """The largest train_ratio any trial of the study can draw (its validation split is the common subset)."""
    spec = cfg.search.space.get("train_ratio")
    return float(spec[1]) if spec else cfg.train.train_ratio


def searched_depths(cfg: StudyConfig) -> list[int]:
    """The unfreeze depths the study searches (the fixed one when depth is not searched)."""
    return list(cfg.search.space.get("unfreeze_depth", [cfg.train.unfreeze_depth]))
