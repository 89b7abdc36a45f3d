"""Holdout scoring of the best trials, after the search (the holdout never selects anything)."""

from __future__ import annotations

import logging

import numpy as np
import optuna
from optuna.trial import TrialState

from .. import runtime
from ..config import StudyConfig
from ..images.batches import DeviceData
from ..train import evaluate
from . import artifacts, attrs, ranking
from .attrs import fmt_param
from .dataset import DecodedData

log = logging.getLogger(__name__)


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The best ``k`` complete trials, ranked on the common validation subset (``ranking``)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return ranking.rank(done, k)


def score_holdout(
    study: optuna.Study, cfg: StudyConfig, dataset: DecodedData, device: str | None = None
) -> dict | None:
    """Score the best trials' kept checkpoints (read from the artifact store, whichever worker
    wrote them) on the holdout; prune the checkpoints to policy and store ``best.pt``.

    Each top trial gets a ``holdout`` summary attribute; the best one's full scores
    (confusion matrix, per-class report, misclassified examples, how many holdout images were
    scored and how many left out as copies of training images) go to the study's ``holdout``
    attribute. Returns those full scores, or None without a scorable trial.

    Only ``dataset.holdout_rows(cfg).scored`` is scored: copies of pool images are left out.
    """
    from ..metrics import top_confused_pairs

    dev = runtime.select_device(device or cfg.study.device)
    cache = dataset.cache
    rows = dataset.holdout_rows(cfg)
    if len(rows.scored) == 0:
        if len(rows.copies):
            log.warning("every holdout image is a copy of a training image; skipping holdout scores")
        else:
            log.warning("the study has no holdout (holdout_fraction = 0 and no test/ folder); skipping holdout scores")
        return None
    data = DeviceData(cache, dev)
    # Earlier runs' scores stay: their checkpoints may be gone, their results are not.
    summaries: dict[str, dict] = dict(study.user_attrs.get(attrs.STUDY_HOLDOUT_TOP, {}))
    best_detail, best_trial = None, None
    store = artifacts.open_store(cfg)
    for rank, trial in enumerate(top_trials(study, cfg.study.report_top_k)):
        model = artifacts.load_trial_checkpoint(store, trial, dev)
        if model is None:
            continue
        result = evaluate(model, data, rows.scored, dev)
        scores = result.scores(cache.num_classes)
        summaries[str(trial.number)] = scores.summary()
        if best_detail is None:
            best_trial = trial
            pred = result.probs.argmax(1)
            wrong = np.flatnonzero(pred != result.labels)
            wrong = wrong[np.argsort(-result.probs[wrong, pred[wrong]], kind="stable")]  # most confident first
            best_detail = {
                "trial": trial.number,
                "rank": rank,
                attrs.HOLDOUT_SCORED: len(rows.scored),
                attrs.HOLDOUT_COPIES: len(rows.copies),
                **scores.to_dict(),
                "confused_pairs": top_confused_pairs(scores.confusion, cache.class_names, 20),
                "misclassified": [
                    {
                        "row": int(rows.scored[i]),
                        "true": int(result.labels[i]),
                        "pred": int(pred[i]),
                        "p": float(result.probs[i, pred[i]]),
                    }
                    for i in wrong[:200]
                ],
            }
        del model
    runtime.release_memory(dev)
    study.set_user_attr(attrs.STUDY_HOLDOUT_TOP, summaries)
    if best_detail is not None:
        study.set_user_attr(attrs.STUDY_HOLDOUT, best_detail)
        prune_checkpoints(study, cfg, store, best_trial)
    return best_detail


def prune_checkpoints(study: optuna.Study, cfg: StudyConfig, store, best: optuna.trial.FrozenTrial) -> None:
    """Keep the best trial's checkpoint only (``keep_checkpoints = "best"``), whichever worker
    wrote each; it is the study's ``best.pt`` (study attr ``files``; also written to the results folder)."""
    if cfg.study.keep_checkpoints != "all":
        for trial in study.get_trials(deepcopy=False):
            if trial.number != best.number:
                artifacts.remove(store, artifacts.checkpoint_id(trial))
    best_id = artifacts.checkpoint_id(best)
    files = study.user_attrs.get(attrs.STUDY_FILES, {})
    if best_id and files.get(BEST_FILE) != best_id:  # a new best trial
        artifacts.fetch(store, best_id, cfg.result_dir / BEST_FILE)
        study.set_user_attr(attrs.STUDY_FILES, {**files, BEST_FILE: best_id})  # its checkpoint: no second copy


BEST_FILE = "best.pt"


def results_table(study: optuna.Study, k: int = 10) -> list[dict]:
    """The top trials as plain rows (used by flow artifacts and the console)."""
    rows = []
    holdout = study.user_attrs.get(attrs.STUDY_HOLDOUT_TOP, {})
    for t in top_trials(study, k):
        hold = holdout.get(str(t.number)) or {}
        rows.append(
            {
                "trial": t.number,
                **{k_: fmt_param(v) for k_, v in t.params.items()},
                "val": round(t.value, 4),
                "common_val": None
                if ranking.common_value(t.user_attrs) is None
                else round(ranking.common_value(t.user_attrs), 4),
                "holdout_acc": round(hold["accuracy"], 4) if hold else None,
                "seconds": round(t.user_attrs.get(attrs.TRIAL_TRAIN_SECONDS, 0.0), 1),
            }
        )
    return rows
