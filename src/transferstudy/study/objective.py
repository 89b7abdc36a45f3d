"""The Optuna objective: one fine-tuning run per trial, scored on validation, top checkpoints kept
(in the study's artifact store, ``study.artifacts``)."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from .. import runtime, workers
from ..config import BACKBONE_DEFAULTS, StudyConfig
from ..images.batches import DeviceData
from ..metrics import macro_f1
from ..model import save_checkpoint
from ..splits import common_validation
from ..train import EpochRecord, NonFiniteLossError, evaluate
from ..trial import TrialOutcome, TrialRunner
from . import artifacts, attrs, ranking
from .attrs import FINISHED
from .dataset import DecodedData
from .design import taken_by
from .pruning import report_epoch
from .space import largest_train_ratio, max_epochs, suggest

log = logging.getLogger(__name__)


#: The error of a refused trial (a surplus one, or a second copy of a design entry) starts so.
SURPLUS = "surplus"


class SurplusTrial(Exception):
    """A trial the study does not need: other workers already started the last trial the study
    needs, or already hold this trial's design entry."""


#: Errors that fail one trial and let the study go on (Optuna's ``catch``): the trial's error
#: attr and the runner's progress line say what happened.
TRIAL_FAILURES = (NonFiniteLossError, torch.OutOfMemoryError, SurplusTrial)


class _SaidOnce(logging.Filter):
    """Drops Optuna's two warnings about a trial that failed with a ``TRIAL_FAILURES`` error (a
    traceback, then "failed with value None"): the progress line already says it, in the
    project's words. A refused trial is routine when several workers share a study. Any other
    error keeps Optuna's warning (and ends the run)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: set[str] = set()  # "Trial N failed" whose second warning is still to come

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Trial ") or " failed with " not in message:
            return True
        head = message.split(" failed with ", 1)[0]
        if record.exc_info and isinstance(record.exc_info[1], TRIAL_FAILURES):
            self.pending.add(head)
            return False
        if message.startswith(f"{head} failed with value") and head in self.pending:
            self.pending.discard(head)
            return False
        return True


logging.getLogger("optuna.study._optimize").addFilter(_SaidOnce())


class Objective:
    """The Optuna objective: one fine-tuning run per trial (``trial.TrialRunner``), scored on validation.

    Data is placed on the device once and shared by every trial of this process; each trial
    builds a fresh network, and its memory is released before the next one starts.
    """

    def __init__(self, cfg: StudyConfig, dataset: DecodedData, device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        # Weights are obtained once, before any trial: unusable weights end the run at once
        # with their own error instead of failing every trial.
        self.runner = study_runner(cfg, dataset, device, cfg.train.weights)
        self.weights = self.runner.weights
        self.longest = max_epochs(cfg)
        ratio = largest_train_ratio(cfg)
        self.common_rows = common_validation(dataset.cache, ratio, cfg.data.holdout_fraction, cfg.data.split_seed)
        #: The study attr ``common_subset``: what the trials are ranked on.
        self.common_subset = {"train_ratio": ratio, "rows": len(self.common_rows), "metric": cfg.study.objective}
        #: The study attr ``regime``: the views every trial trains on (written by the first trial started here).
        self.regime = self.runner.regime(cfg.train).describe()
        self._regime_stored = False
        self.store = artifacts.open_store(cfg) if cfg.study.keep_checkpoints != "none" else None

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        _refuse_surplus(trial, self.cfg.study.n_trials)
        settings = suggest(trial, self.cfg).for_backbone(self.weights.pretrained)
        history: list[dict] = []
        metric = record_metric(self.cfg.study.objective)

        def on_start(splits, regime: dict) -> None:
            self._store_regime(trial)
            _set_attrs(
                trial,
                {
                    attrs.TRIAL_REGIME: regime,
                    attrs.TRIAL_DEVICE: runtime.describe(self.device),
                    attrs.TRIAL_WORKER: workers.identity(),
                    attrs.TRIAL_WEIGHTS: self.weights.used,
                    attrs.TRIAL_SPLIT_SIZES: splits.sizes(),
                    attrs.TRIAL_EFFECTIVE_SETTINGS: {key: getattr(settings, key) for key in BACKBONE_DEFAULTS},
                },
            )

        def on_epoch_end(record: EpochRecord) -> bool:
            history.append(vars(record).copy())
            _set_attrs(trial, {attrs.TRIAL_HISTORY: history})
            report_epoch(trial, getattr(record, metric), record.epoch, settings, self.longest)
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
        _set_attrs(
            trial,
            {
                attrs.TRIAL_VAL_ACCURACY: final.val_acc,
                attrs.TRIAL_VAL_MACRO_F1: final.val_f1,
                attrs.TRIAL_IMAGES_PER_S: result.images_per_s,
                attrs.TRIAL_BEST_EPOCH: result.best_epoch,
                attrs.TRIAL_COMMON_VAL: subset_score(outcome, self.runner.data, self.common_rows, metric, self.device),
            },
        )
        value = getattr(final, metric)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"validation {metric} is {value}: the validation split is empty")
        if isinstance(trial, optuna.Trial) and self.cfg.study.keep_checkpoints != "none":
            self._keep_checkpoint(trial, outcome.model, value)
        return value

    def _store_regime(self, trial: optuna.trial.BaseTrial) -> None:
        if isinstance(trial, optuna.Trial) and not self._regime_stored:
            trial.study.set_user_attr(attrs.STUDY_REGIME, self.regime)
            self._regime_stored = True

    def _keep_checkpoint(self, trial: optuna.Trial, model, value: float) -> None:
        """Store this trial's model in the artifact store while it ranks among the top ``report_top_k``.

        The holdout scores of the top trials need their models, read back by the parent from the
        store whichever machine ran the trial. Checkpoints of this process's own trials that fall
        out of the top are removed as the study goes, so the store holds about ``report_top_k``
        models per worker. Another worker's checkpoints are left to it, and the rest to the
        holdout scoring, which runs once per study (``holdout.prune_checkpoints``).
        """
        k = self.cfg.study.report_top_k
        done = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
        mine = trial.user_attrs
        common = (
            ranking.on_common_subset(done) and ranking.common_value(mine) is not None
        )  # ranked as ``ranking.rank`` does
        score = lambda value, user_attrs: ranking.ranking_value(value, user_attrs, common)  # noqa: E731
        ranked = sorted(
            [(score(t.value, t.user_attrs), -t.number, t) for t in done] + [(score(value, mine), -trial.number, None)],
            key=lambda r: r[:2],
            reverse=True,
        )
        keep_all = self.cfg.study.keep_checkpoints == "all"
        if not keep_all and all(r[2] is not None for r in ranked[:k]):
            return
        cache = self.dataset.cache
        with tempfile.TemporaryDirectory(prefix="transferstudy-ckpt-") as tmp:
            path = save_checkpoint(
                Path(tmp) / f"trial_{trial.number:04d}.pt",
                model,
                cache.class_names,
                cache.image_size,
                cache.resize_mode,
                {"trial": trial.number, "params": trial.params},
            )
            trial.set_user_attr(attrs.TRIAL_CHECKPOINT, artifacts.put_trial_file(trial, self.store, path))
        if not keep_all:
            me = workers.identity()
            for _, _, old in ranked[k:]:
                if old is not None and _written_by(old, me):
                    artifacts.remove(self.store, artifacts.checkpoint_id(old))


def _written_by(trial: optuna.trial.FrozenTrial, me: dict) -> bool:
    """Whether this process (host and pid of ``workers.identity``) ran the trial."""
    who = trial.user_attrs.get(attrs.TRIAL_WORKER) or {}
    return (who.get("host"), who.get("pid")) == (me["host"], me["pid"])


def study_runner(cfg: StudyConfig, dataset: DecodedData, device: torch.device, weights: str) -> TrialRunner:
    """The ``TrialRunner`` of the study's trials: its splits, its feature cache, its backbone seed."""
    return TrialRunner(
        dataset.cache,
        weights,
        device,
        cfg.data.holdout_fraction,
        cfg.data.split_seed,
        feature_dir=Path(cfg.data.cache_dir) / "features",
        init_seed=cfg.train.train_seed,
    )


def record_metric(objective: str) -> str:
    """The ``EpochRecord`` field of a study objective (val_accuracy -> val_acc, val_macro_f1 -> val_f1)."""
    return "val_f1" if objective == "val_macro_f1" else "val_acc"


def subset_score(
    outcome: TrialOutcome, data: DeviceData, rows: np.ndarray, metric: str, device: torch.device
) -> float | None:
    """The trained network's ``metric`` (val_acc or val_f1) on ``rows`` of the pool, computed as its
    own validation is (centre view, the same frozen-activation cache); None without rows.

    Raises:
        RuntimeError: the run trained on some of ``rows`` (they would not measure anything).
    """
    if len(rows) == 0:
        return None
    if np.intersect1d(rows, outcome.splits.train).size:
        raise RuntimeError(
            f"{np.intersect1d(rows, outcome.splits.train).size} scored rows are training rows of this run"
        )
    s = outcome.settings
    result = evaluate(outcome.model, data, rows, device, s.eval_batch_size, s.autocast, outcome.features)
    if metric == "val_acc":
        return result.accuracy
    return macro_f1(result.labels, result.probs.argmax(1), outcome.model.num_classes)


def _set_attrs(trial: optuna.trial.BaseTrial, values: dict) -> None:
    for key, value in values.items():
        trial.set_user_attr(key, value)


def _refuse_surplus(trial: optuna.trial.BaseTrial, n_trials: int) -> None:
    """With several workers, the trial numbered past ``n_trials`` finished-or-running trials fails
    at once (and this worker stops); so does a second copy of a design entry."""
    if not isinstance(trial, optuna.Trial):
        return
    others = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    ahead = sum(1 for t in others if t.number < trial.number)
    if ahead >= n_trials:
        trial.study.stop()
        refuse(trial, f"the study already has {n_trials} finished or running trials")
    holder = taken_by(trial)
    if holder is not None:
        refuse(trial, f"trial #{holder} already has design entry {trial.user_attrs[attrs.TRIAL_DESIGN]}")


def refuse(trial: optuna.Trial, reason: str) -> None:
    """Fail ``trial`` before it trains, as a refused one (``is_refused``)."""
    trial.set_user_attr(attrs.TRIAL_ERROR, f"{SURPLUS}: {reason}")
    raise SurplusTrial(reason)


def is_refused(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial failed as a surplus one: it never trained, and says nothing about the study."""
    return str(trial.user_attrs.get(attrs.TRIAL_ERROR, "")).startswith(SURPLUS)
