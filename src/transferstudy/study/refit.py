"""The model a user walks away with (DESIGN decision 8): the chosen configuration trained once
more on the whole non-holdout pool, scored once on the holdout, and exported.

    summary = refit_best(study, cfg, dataset)   # after run_study and score_holdout

The chosen configuration is the best complete trial's: its searched values over ``[train]``
(unfreeze depth, lr, epochs...), with ``[refit] seed`` as train seed. It trains on every pool
image (train + validation) for the trial's number of epochs. Nothing is left to validate on and
the holdout picks nothing, so the network after the last epoch is the model. The holdout then
scores it once: accuracy with a 95% Wilson interval, macro-F1, top-5; with ``tta = "flip"`` also
the mean of each image's and its mirror's probabilities.

The model goes to ``<result_dir>/model/`` (``export.export_model``: ONNX, torch.export,
model.json); without the export extra, to the checkpoint ``<result_dir>/refit.pt`` with a
warning. Its description goes to the study attr ``refit`` (``attrs.STUDY_REFIT``), which the
report's model card reads. A resumed study refits again only when the best trial, its settings,
``[refit]`` or the dataset changed, or the model files are gone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from .. import export, runtime
from ..config import StudyConfig, TrainSection
from ..images.batches import IMAGENET_MEAN, IMAGENET_STD, DeviceData
from ..images.cache import ImageCache
from ..metrics import ClassificationScores, score, top_confused_pairs
from ..model import STAGE_NAMES, TransferNet, save_checkpoint
from ..splits import HoldoutRows, Splits
from ..train import evaluate
from . import artifacts, attrs
from .dataset import DecodedData
from .holdout import top_trials
from .objective import study_runner

log = logging.getLogger(__name__)

#: Where the refit model goes, inside ``<result_dir>``: the exported folder, or (without the
#: export extra) a study checkpoint that ``python -m transferstudy.predict`` also reads.
MODEL_DIR = "model"
FALLBACK_CHECKPOINT = "refit.pt"
#: Normal quantile of a two-sided 95% interval.
Z_95 = 1.959964
#: Confused pairs and weakest classes kept for the model card; holdout images in the ONNX check.
KNOWN_WEAKNESSES = 10
CHECK_IMAGES = 64


def refit_best(study: optuna.Study, cfg: StudyConfig, dataset: DecodedData, device: str | None = None) -> dict | None:
    """Refit the best complete trial's configuration on the whole pool, score it on the holdout,
    export it, and store its description in the study attr ``refit``.

    Returns:
        That description (also when an earlier run's refit is still up to date), or None when
        ``[refit] enabled`` is false or the study has no complete trial.
    """
    if not cfg.refit.enabled:
        log.info("refit skipped: [refit] enabled = false")
        return None
    best = top_trials(study, 1)
    if not best:
        log.warning("refit skipped: the study has no complete trial")
        return None
    trial, cache = best[0], dataset.cache
    settings = cfg.train.with_params({**trial.params, "train_seed": cfg.refit.seed})
    weights = trial.user_attrs.get(attrs.TRIAL_WEIGHTS, cfg.train.weights)  # what the trials' backbone held
    key = refit_key(cfg, settings, weights, cache.fingerprint)
    previous = study.user_attrs.get(attrs.STUDY_REFIT)
    if up_to_date(previous, trial.number, key):
        log.info("refit of trial #%d is up to date (%s); not training it again", trial.number, previous["files"][0])
        return previous
    started = time.perf_counter()
    dev = runtime.select_device(device or cfg.study.device)
    runtime.configure(dev)
    rows = dataset.holdout_rows(cfg)  # the pool, and the holdout to score (less its copies of pool images)
    runner = study_runner(cfg, dataset, dev, weights)  # the same runner setup as the search's trials
    log.info(
        "refit: trial #%d's settings on all %d pool images, %d epoch(s), seed %d",
        trial.number,
        len(rows.pool),
        settings.epochs,
        settings.train_seed,
    )
    whole_pool = Splits(train=rows.pool, val=rows.pool[:0], holdout=np.union1d(rows.scored, rows.copies))
    outcome = runner.run_trial(settings, splits=whole_pool)
    summary = {
        "key": key,
        **describe_choice(trial, outcome.settings or settings, runner.weights.used, cfg.study.objective),
        "train_samples": len(rows.pool),
        "train_seconds": outcome.seconds,
        "final_train_loss": outcome.result.final.train_loss,
        "tta": cfg.refit.tta,
        "preprocessing": preprocessing(cache),
        **score_refit(outcome.model, runner.data, rows, cache.class_names, settings, dev, cfg.refit.tta),
    }
    meta = {k: summary[k] for k in ("trial", "params", "seed", "weights", "train_samples", "holdout", "holdout_tta")}
    summary.update(save_model(outcome.model, cache, cfg.result_dir, {"study": study.study_name, **meta}, rows.scored))
    artifacts.put_study_files(study, cfg, [Path(f) for f in summary["files"]])  # for whoever runs the report
    summary["seconds"] = time.perf_counter() - started
    del runner, outcome
    runtime.release_memory(dev)
    study.set_user_attr(attrs.STUDY_REFIT, summary)
    hold = summary["holdout"] or {}
    log.info(
        "refit of trial #%d: holdout accuracy %s on %s images, in %.0f s",
        trial.number,
        f"{hold['accuracy']:.4f}" if hold else "— (no holdout)",
        hold.get("n", 0),
        summary["seconds"],
    )
    return summary


def describe_choice(trial: optuna.trial.FrozenTrial, s: TrainSection, weights: str, objective: str) -> dict:
    """The chosen configuration as the model card shows it: the trial it comes from, what it
    searched and scored there, and what of the network trains (``s``: as trained)."""
    frozen = len(STAGE_NAMES) - s.unfreeze_depth
    return {
        "trial": trial.number,
        "params": dict(trial.params),
        "settings": s.model_dump(),
        "seed": s.train_seed,
        "weights": weights,
        "unfreeze_depth": s.unfreeze_depth,
        "trainable": [*STAGE_NAMES[frozen:], "head"],
        "frozen": list(STAGE_NAMES[:frozen]),
        "epochs": s.epochs,
        "search": {
            "objective": objective,
            "value": trial.value,
            "val_accuracy": trial.user_attrs.get(attrs.TRIAL_VAL_ACCURACY),
            "split_sizes": trial.user_attrs.get(attrs.TRIAL_SPLIT_SIZES),
        },
    }


def refit_key(cfg: StudyConfig, settings: TrainSection, weights: str, fingerprint: str) -> str:
    """What determines the refit model: the settings, ``[refit]``, the backbone, the data and its holdout."""
    text = json.dumps(
        {
            "train": settings.model_dump(),
            "refit": cfg.refit.model_dump(),
            "weights": weights,
            "data": fingerprint,
            "holdout": [cfg.data.holdout_fraction, cfg.data.split_seed],
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def up_to_date(previous: dict | None, trial: int, key: str) -> bool:
    """A stored refit is of this trial and key, its files are still there, and it was exported
    (or still cannot be: the export extra was not installed since)."""
    if not previous or previous.get("trial") != trial or previous.get("key") != key:
        return False
    if not previous.get("exported") and can_export():
        return False
    files = previous.get("files") or []
    return bool(files) and all(Path(f).is_file() for f in files)


def can_export() -> bool:
    """Whether the export extra (onnx, onnxscript) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def preprocessing(cache: ImageCache) -> dict:
    """What an image goes through before the network (the form ``export.export_model`` takes)."""
    return {
        "image_size": cache.image_size,
        "resize_mode": cache.resize_mode,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


# --------------------------------------------------------------------------- holdout scores


def wilson_interval(hits: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): sound near 0 and 1 and for small n,
    where the normal approximation is not. (NaN, NaN) without observations."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def holdout_summary(
    labels: np.ndarray, probs: np.ndarray, num_classes: int, copies: int
) -> tuple[dict, ClassificationScores]:
    """(accuracy with its 95% interval, top-5, macro- and weighted F1, n and the copies left out;
    all the scores)."""
    scores = score(labels, probs, num_classes)
    hits = int((probs.argmax(1) == labels).sum())
    summary = {
        **scores.summary(),
        "n": len(labels),
        "hits": hits,
        "accuracy_ci95": list(wilson_interval(hits, len(labels))),
        attrs.HOLDOUT_COPIES: copies,
    }
    return summary, scores


@torch.no_grad()
def mirrored_probs(
    model: TransferNet, data: DeviceData, rows: np.ndarray, device: torch.device, batch_size: int, use_autocast: bool
) -> np.ndarray:
    """Softmax probabilities of the horizontally mirrored images of ``rows``."""
    model.eval()
    probs = [np.zeros((0, model.num_classes), np.float32)]
    for batch in data.batch_rows(rows, batch_size):
        x = data.inputs(batch).flip(3).contiguous(memory_format=runtime.memory_format(device))
        with runtime.autocast(device, use_autocast):
            probs.append(torch.softmax(model(x).float(), 1).cpu().numpy())
    return np.concatenate(probs)


def score_refit(
    model: TransferNet,
    data: DeviceData,
    rows: HoldoutRows,
    class_names: list[str],
    s: TrainSection,
    device: torch.device,
    tta: str,
) -> dict:
    """The holdout scores of the refit model (plain and, with ``tta = "flip"``, mirror-averaged) on
    ``rows.scored`` and its known weaknesses: the most confused pairs and the classes with the
    lowest recall (below 1)."""
    if len(rows.scored) == 0:
        log.warning(
            "nothing to score the refit model on: the study has no holdout, or every holdout image copies a pool image"
        )
        return {"holdout": None, "holdout_tta": None, "confused_pairs": [], "weakest_classes": []}
    result = evaluate(model, data, rows.scored, device, s.eval_batch_size, s.autocast)
    num_classes, copies = len(class_names), len(rows.copies)
    plain, scores = holdout_summary(result.labels, result.probs, num_classes, copies)
    flipped = None
    if tta == "flip":
        mean = (result.probs + mirrored_probs(model, data, rows.scored, device, s.eval_batch_size, s.autocast)) / 2
        flipped, _ = holdout_summary(result.labels, mean, num_classes, copies)
    missed = np.flatnonzero((scores.support > 0) & (scores.recall < 1.0))
    weakest = missed[np.argsort(scores.recall[missed], kind="stable")][:KNOWN_WEAKNESSES]
    return {
        "holdout": plain,
        "holdout_tta": flipped,
        "confused_pairs": top_confused_pairs(scores.confusion, class_names, KNOWN_WEAKNESSES),
        "weakest_classes": [
            {
                "class": class_names[c],
                "recall": float(scores.recall[c]),
                "f1": float(scores.f1[c]),
                "support": int(scores.support[c]),
            }
            for c in weakest
        ],
    }


# --------------------------------------------------------------------------- files


def save_model(model: TransferNet, cache: ImageCache, result_dir: Path, meta: dict, holdout: np.ndarray) -> dict:
    """Export the model to ``<result_dir>/model/`` and check ONNX Runtime against PyTorch on a few
    ``holdout`` rows; without the export extra, save a checkpoint instead (one warning).

    Returns:
        ``model_dir`` (None when not exported), ``files``, ``exported``, ``tensors`` (input and
        output names), ``export_check`` and ``export_warning``.
    """
    out = result_dir / MODEL_DIR
    try:
        doc = export.export_model(model, cache.class_names, preprocessing(cache), out, meta)
    except export.ExportUnavailableError as exc:
        path = save_checkpoint(
            result_dir / FALLBACK_CHECKPOINT, model, cache.class_names, cache.image_size, cache.resize_mode, meta
        )
        warning = f"refit model not exported ({exc}); saved the PyTorch checkpoint {path} instead"
        log.warning(warning)
        return {
            "model_dir": None,
            "files": [str(path)],
            "exported": False,
            "tensors": None,
            "export_check": None,
            "export_warning": warning,
        }
    files = [str(out / name) for name in (*doc["files"].values(), export.META_FILE)]
    return {
        "model_dir": str(out),
        "files": files,
        "exported": True,
        "tensors": {"input": doc["input"]["name"], "output": doc["output"]["name"]},
        "export_check": check_files(out, cache, holdout),
        "export_warning": None,
    }


def check_files(out: Path, cache: ImageCache, holdout: np.ndarray) -> dict | None:
    """ONNX Runtime vs the PyTorch file on up to ``CHECK_IMAGES`` holdout images (None without
    onnxruntime or a holdout)."""
    if len(holdout) == 0:
        return None
    try:
        check = export.check_export(out, np.asarray(cache.images[holdout[:CHECK_IMAGES]]))
    except export.ExportUnavailableError as exc:
        log.info("exported files not cross-checked: %s", exc)
        return None
    if check["top1_agreement"] < 1.0:
        log.warning(
            "ONNX Runtime and PyTorch disagree on %.1f%% of %d holdout images (max logit difference %.3g)",
            100 * (1 - check["top1_agreement"]),
            check["images"],
            check["max_abs_logit_diff"],
        )
    return check
