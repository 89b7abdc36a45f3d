"""The Optuna objective: one fine-tuning run per trial, scored on validation, top checkpoints kept."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from .. import runtime
from ..config import StudyConfig
from ..model import save_checkpoint
from ..train import EpochRecord, NonFiniteLossError
from ..trial import TrialRunner
from . import attrs
from .attrs import FINISHED
from .dataset import DecodedData
from .space import suggest

log = logging.getLogger(__name__)


class SurplusTrial(Exception):
    """Another worker already started the last trial the study needs."""


class Objective:
    """The Optuna objective: one fine-tuning run per trial (``trial.TrialRunner``), scored on validation.

    Data is placed on the device once and shared by every trial of this process; each trial
    builds a fresh network, and its memory is released before the next one starts.
    """

    def __init__(self, cfg: StudyConfig, dataset: DecodedData, device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        # Weights are obtained once, before any trial: unusable weights end the run at once
        # with their own error instead of failing every trial.
        self.runner = TrialRunner(
            dataset.cache,
            cfg.train.weights,
            device,
            cfg.data.holdout_fraction,
            cfg.data.split_seed,
            feature_dir=Path(cfg.data.cache_dir) / "features",
            init_seed=cfg.train.train_seed,
        )
        self.weights = self.runner.weights

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        _refuse_surplus(trial, self.cfg.study.n_trials)
        settings = suggest(trial, self.cfg)
        history: list[dict] = []
        metric = "val_f1" if self.cfg.study.objective == "val_macro_f1" else "val_acc"

        def on_start(splits) -> None:
            _set_attrs(trial, {
                attrs.TRIAL_DEVICE: runtime.describe(self.device),
                attrs.TRIAL_WEIGHTS: self.weights.used,
                attrs.TRIAL_SPLIT_SIZES: splits.sizes(),
            })

        def on_epoch_end(record: EpochRecord) -> bool:
            history.append(vars(record).copy())
            _set_attrs(trial, {attrs.TRIAL_HISTORY: history})
            value = getattr(record, metric)
            if isinstance(trial, optuna.Trial):
                trial.report(value, record.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {record.epoch} ({metric} {value:.4f})")
            return False

        started = time.perf_counter()
        try:
            outcome = self.runner.run_trial(settings, on_epoch_end, metric, on_start)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            _set_attrs(trial, {attrs.TRIAL_ERROR: f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            _set_attrs(trial, {attrs.TRIAL_TRAIN_SECONDS: time.perf_counter() - started})
        features, result = outcome.features, outcome.result
        if features is not None:
            cache_info = {"views_built": sum(features.built), "build_seconds": features.build_seconds}
            _set_attrs(trial, {attrs.TRIAL_FEATURE_CACHE: cache_info})
        final = result.final
        _set_attrs(trial, {
            attrs.TRIAL_VAL_ACCURACY: final.val_acc,
            attrs.TRIAL_VAL_MACRO_F1: final.val_f1,
            attrs.TRIAL_IMAGES_PER_S: result.images_per_s,
            attrs.TRIAL_BEST_EPOCH: result.best_epoch,
        })
        value = getattr(final, metric)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"validation {metric} is {value}: the validation split is empty")
        if isinstance(trial, optuna.Trial) and self.cfg.study.keep_checkpoints != "none":
            self._keep_checkpoint(trial, outcome.model, value)
        return value

    def _keep_checkpoint(self, trial: optuna.Trial, model, value: float) -> None:
        """Save this trial's model while it ranks among the top ``report_top_k``.

        The holdout scores of the top trials need their models; checkpoints that fall out of
        the top are deleted as the study goes, so disk use stays at ``report_top_k`` models.
        """
        k = self.cfg.study.report_top_k
        done = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
        ranked = sorted([(t.value, -t.number, t) for t in done] + [(value, -trial.number, None)], key=lambda r: r[:2], reverse=True)
        keep_all = self.cfg.study.keep_checkpoints == "all"
        if not keep_all and all(r[2] is not None for r in ranked[:k]):
            return
        cache = self.dataset.cache
        path = checkpoint_dir(self.cfg) / f"trial_{trial.number:04d}.pt"
        save_checkpoint(path, model, cache.class_names, cache.image_size, cache.resize_mode, {"trial": trial.number, "params": trial.params})
        trial.set_user_attr(attrs.TRIAL_CHECKPOINT, str(path))
        if not keep_all:
            for _, _, old in ranked[k:]:
                if old is not None:
                    drop_checkpoint(old)


def drop_checkpoint(trial: optuna.trial.FrozenTrial) -> None:
    """Delete a trial's checkpoint file (finished trials are read-only: the attribute stays)."""
    path = trial.user_attrs.get(attrs.TRIAL_CHECKPOINT)
    if path:
        Path(path).unlink(missing_ok=True)


def _set_attrs(trial: optuna.trial.BaseTrial, values: dict) -> None:
    for key, value in values.items():
        trial.set_user_attr(key, value)


def _refuse_surplus(trial: optuna.trial.BaseTrial, n_trials: int) -> None:
    """With several workers, the trial numbered past ``n_trials`` finished-or-running trials fails at once."""
    if not isinstance(trial, optuna.Trial):
        return
    others = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    ahead = sum(1 for t in others if t.number < trial.number)
    if ahead >= n_trials:
        trial.study.stop()
        trial.set_user_attr(attrs.TRIAL_ERROR, f"surplus: the study already has {n_trials} finished or running trials")
        raise SurplusTrial(f"the study already has {n_trials} finished or running trials")


def checkpoint_dir(cfg: StudyConfig) -> Path:
    return (cfg.result_dir / "checkpoints").resolve()
