"""Optuna studies: search space, objective, storage, sampler, pruner, resume, holdout scoring.

A study searches unfreeze depth, learning rate, epochs and train/validation split ratio (plus
any optional dimensions of the study file). Optuna optimises the validation metric; the fixed
holdout is scored only for the best trials, after the search (DESIGN decision 2).

What a study leaves in its storage (the report is rebuilt from this alone):

* study user attrs: ``config`` (resolved study file), ``dataset`` (classes, split sizes,
  holdout protocol, skipped files, cache location), ``runs`` (one entry per run: device,
  weights, command), ``holdout`` (detailed holdout scores of the best trial).
* trial user attrs: ``history`` (one dict per epoch), ``val_accuracy``, ``val_macro_f1``,
  ``train_seconds``, ``images_per_s``, ``device``, ``weights``, ``split_sizes``,
  ``checkpoint`` (path; the file is deleted when the trial leaves the top), ``error``.
* study user attr ``holdout_top``: holdout summary (accuracy, top-5, F1) per top trial number.

Studies resume: running the same study again continues up to ``n_trials`` finished trials in
total. Trials of a killed worker stop sending heartbeats; the next run marks them failed and
re-runs their parameters (a run started within the grace period, ``2 x heartbeat_s``, waits
it out when those trials are all that make the study look full).
"""

from __future__ import annotations

import logging
import math
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
import torch
from optuna.trial import TrialState

from . import runtime
from .config import StudyConfig
from .data import Augment, DeviceData, ImageCache, holdout_indices, holdout_protocol, load_cache, make_splits
from .features import FeatureStore
from .datasets.base import DatasetIndex
from .model import build_model, load_checkpoint, save_checkpoint
from .train import EpochRecord, NonFiniteLossError, TrainSettings, evaluate, fit

log = logging.getLogger(__name__)

#: Trial states that count towards ``n_trials`` (failed trials are retried, so they don't).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Where the demo digits are written.
DEMO_DIR = Path("studies/data")
#: A study stops after this many failures in a row: something is wrong beyond one trial.
MAX_CONSECUTIVE_FAILURES = 5


class SurplusTrial(Exception):
    """Another worker already started the last trial the study needs."""


# --------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """A dataset decoded and validated for one study."""

    index: DatasetIndex
    cache: ImageCache

    def summary(self, cfg: StudyConfig) -> dict:
        cache = self.cache
        splits = make_splits(cache, cfg.train.train_ratio, cfg.data.holdout_fraction, cfg.data.split_seed)
        return {
            "path": str(self.index.root),
            "source": self.index.source,
            "num_classes": cache.num_classes,
            "class_names": cache.class_names,
            "num_images": len(cache),
            "pool_images": len(splits.train) + len(splits.val),
            "holdout_images": len(splits.holdout),
            "holdout_protocol": holdout_protocol(cache, cfg.data.holdout_fraction),
            "image_size": cache.image_size,
            "fingerprint": cache.fingerprint,
            "cache_dir": str(Path(cfg.data.cache_dir).resolve() / cache.fingerprint),
            "problems": [[p.path, p.reason] for p in cache.problems],
            "warnings": cache.warnings,
        }


def open_index(cfg: StudyConfig) -> DatasetIndex:
    """The study's dataset as an index: the embedded digits for ``demo``, else the given path."""
    from .prepare import open_dataset

    if cfg.data.path == "demo":
        from .datasets.demo import write_digits

        per_class = cfg.data.demo_per_class or None
        folder = DEMO_DIR / (f"digits-{per_class}" if per_class else "digits")
        return open_dataset(write_digits(folder, per_class=per_class), "folders")
    return open_dataset(cfg.data.path, cfg.data.format)


def prepare_data(cfg: StudyConfig, show_progress: bool = True) -> PreparedData:
    """Scan, validate and decode the dataset once (reusing the on-disk cache when unchanged)."""
    index = open_index(cfg)
    cache = load_cache(index, cfg.data.image_size, cfg.data.cache_dir, cfg.data.resize_mode, show_progress=show_progress)
    return PreparedData(index=index, cache=cache)


# --------------------------------------------------------------------------- search space


def suggest(trial: optuna.trial.BaseTrial, cfg: StudyConfig) -> dict:
    """All training settings of one trial: searched ones from Optuna, the rest from ``[train]``."""
    params = {k: v for k, v in vars(cfg.train).items()}
    for key, spec in cfg.search.space.items():
        if key in ("unfreeze_depth", "batch_size", "optimizer"):
            params[key] = trial.suggest_categorical(key, spec)
        elif key in ("lr", "weight_decay", "backbone_lr_mult"):
            params[key] = trial.suggest_float(key, spec[0], spec[1], log=True)
        elif key == "epochs":
            params[key] = trial.suggest_int(key, spec[0], spec[1])
        else:  # train_ratio, label_smoothing
            params[key] = trial.suggest_float(key, spec[0], spec[1])
    return params


def max_epochs(cfg: StudyConfig) -> int:
    spec = cfg.search.space.get("epochs")
    return int(spec[1]) if spec else cfg.train.epochs


def train_settings(params: dict) -> TrainSettings:
    return TrainSettings(
        epochs=params["epochs"],
        lr=params["lr"],
        batch_size=params["batch_size"],
        optimizer=params["optimizer"],
        momentum=params["momentum"],
        weight_decay=params["weight_decay"],
        backbone_lr_mult=params["backbone_lr_mult"],
        label_smoothing=params["label_smoothing"],
        warmup_epochs=params["warmup_epochs"],
        augment=Augment(crop_scale=(params["crop_scale_min"], 1.0), enabled=params["augment"]),
        eval_batch_size=params["eval_batch_size"],
        seed=params["train_seed"],
        compile=params["compile"],
    )


# --------------------------------------------------------------------------- objective


class Objective:
    """The Optuna objective: one fine-tuning run per trial, scored on validation.

    Data is placed on the device once and shared by every trial of this process; each trial
    builds a fresh network, and its memory is released before the next one starts.
    """

    def __init__(self, cfg: StudyConfig, prepared: PreparedData, device: torch.device):
        self.cfg, self.prepared, self.device = cfg, prepared, device
        self.data = DeviceData(prepared.cache, device)
        # Weights are obtained once, before any trial: unusable weights end the run at once
        # with their own error instead of failing every trial.
        runtime.seed_everything(cfg.train.train_seed)
        model, self.weights = build_model(prepared.cache.num_classes, cfg.train.weights, 0)
        self._backbone_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
        self.pool_rows, _ = holdout_indices(prepared.cache, cfg.data.holdout_fraction, cfg.data.split_seed)
        self.features: FeatureStore | None = None

    def build(self, unfreeze_depth: int):
        """A fresh network for one trial: the study's backbone weights and a new, seeded head."""
        model, _ = build_model(self.prepared.cache.num_classes, "none", unfreeze_depth)
        model.load_state_dict(self._backbone_state, strict=False)
        return model

    def _features(self, model, params: dict):
        """The frozen-activation cache for this trial's depth (built by the first trial that needs it)."""
        if params["feature_views"] == 0:
            return None
        if self.features is None:
            cache = self.prepared.cache
            aug = Augment(crop_scale=(params["crop_scale_min"], 1.0), enabled=params["augment"])
            self.features = FeatureStore(
                key_prefix=f"{cache.fingerprint}|{self.weights.used}",
                num_views=params["feature_views"] if params["augment"] else 1,
                aug=aug,
                seed=params["train_seed"],
                memory_fraction=params["feature_memory_fraction"],
                disk_dir=Path(self.cfg.data.cache_dir) / "features" if self.weights.pretrained else None,
            )
        return self.features.get(model, self.data, self.pool_rows, self.device)

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        _refuse_surplus(trial, self.cfg.study.n_trials)
        params = suggest(trial, self.cfg)
        settings = train_settings(params)
        cache = self.prepared.cache
        splits = make_splits(cache, params["train_ratio"], self.cfg.data.holdout_fraction, self.cfg.data.split_seed)
        runtime.seed_everything(settings.seed)
        model = self.build(params["unfreeze_depth"])
        features = self._features(model, params)
        _set_attrs(trial, device=runtime.describe(self.device), weights=self.weights.used, split_sizes=splits.sizes())
        history: list[dict] = []
        metric = "val_f1" if self.cfg.study.objective == "val_macro_f1" else "val_acc"

        def on_epoch_end(record: EpochRecord) -> bool:
            history.append(vars(record).copy())
            _set_attrs(trial, history=history)
            value = getattr(record, metric)
            if isinstance(trial, optuna.Trial):
                trial.report(value, record.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {record.epoch} ({metric} {value:.4f})")
            return False

        started = time.perf_counter()
        try:
            result = fit(model, self.data, splits.train, splits.val, settings, self.device, on_epoch_end, features, monitor=metric)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            _set_attrs(trial, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            _set_attrs(trial, train_seconds=time.perf_counter() - started)
            runtime.release_memory(self.device)
        if features is not None:
            self.features.save(features, self.prepared.cache.image_size)
            _set_attrs(trial, feature_cache={"views_built": sum(features.built), "build_seconds": features.build_seconds})
        final = result.final
        _set_attrs(
            trial,
            val_accuracy=final.val_acc,
            val_macro_f1=final.val_f1,
            images_per_s=result.images_per_s,
            best_epoch=result.best_epoch,
        )
        value = getattr(final, metric)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"validation {metric} is {value}: the validation split is empty")
        if isinstance(trial, optuna.Trial) and self.cfg.study.keep_checkpoints != "none":
            self._keep_checkpoint(trial, model, value)
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
        cache = self.prepared.cache
        path = checkpoint_dir(self.cfg) / f"trial_{trial.number:04d}.pt"
        save_checkpoint(path, model, cache.class_names, cache.image_size, cache.resize_mode, {"trial": trial.number, "params": trial.params})
        trial.set_user_attr("checkpoint", str(path))
        if not keep_all:
            for _, _, old in ranked[k:]:
                if old is not None:
                    _drop_checkpoint(old)


def _drop_checkpoint(trial: optuna.trial.FrozenTrial) -> None:
    """Delete a trial's checkpoint file (finished trials are read-only: the attribute stays)."""
    path = trial.user_attrs.get("checkpoint")
    if path:
        Path(path).unlink(missing_ok=True)


def _set_attrs(trial: optuna.trial.BaseTrial, **attrs) -> None:
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _refuse_surplus(trial: optuna.trial.BaseTrial, n_trials: int) -> None:
    """With several workers, the trial numbered past ``n_trials`` finished-or-running trials fails at once."""
    if not isinstance(trial, optuna.Trial):
        return
    others = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    ahead = sum(1 for t in others if t.number < trial.number)
    if ahead >= n_trials:
        trial.study.stop()
        trial.set_user_attr("error", f"surplus: the study already has {n_trials} finished or running trials")
        raise SurplusTrial(f"the study already has {n_trials} finished or running trials")


def checkpoint_dir(cfg: StudyConfig) -> Path:
    return (cfg.result_dir / "checkpoints").resolve()


# --------------------------------------------------------------------------- study


def create_storage(url: str, heartbeat_s: int = 30) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so trials of killed workers are detected and retried.

    Raises:
        ValueError: the storage cannot be reached or opened (the message names the URL).
    """
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 30.0}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_s,
            grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    except Exception as exc:  # SQLAlchemy raises many kinds; all mean "cannot use this URL"
        raise ValueError(f"cannot open Optuna storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def build_sampler(cfg: StudyConfig, existing_trials: int = 0) -> optuna.samplers.BaseSampler:
    """The seeded sampler of one run.

    The seed moves on with the number of trials already in the study: a fresh study is
    reproducible from ``sampler_seed``, and a resumed one does not replay the suggestions of
    its first run.
    """
    seed = cfg.study.sampler_seed + 7919 * existing_trials
    if cfg.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(3, min(10, cfg.study.n_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def build_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    if cfg.study.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.study.pruner == "hyperband":
        # max_resource fixed to the epochs upper bound: "auto" misbehaves when epochs vary.
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs(cfg)), reduction_factor=3)
    return optuna.pruners.MedianPruner(
        n_startup_trials=3, n_warmup_steps=cfg.study.pruner_warmup_epochs, n_min_trials=3
    )


def open_study(cfg: StudyConfig) -> optuna.Study:
    """Create the study or load it to resume (same name, same storage)."""
    storage = create_storage(cfg.study.storage, cfg.study.heartbeat_s)
    try:
        existing = len(storage.get_all_trials(storage.get_study_id_from_name(cfg.study.name), deepcopy=False))
    except KeyError:  # a new study
        existing = 0
    return optuna.create_study(
        study_name=cfg.study.name,
        storage=storage,
        sampler=build_sampler(cfg, existing),
        pruner=build_pruner(cfg),
        direction="maximize",
        load_if_exists=True,
    )


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _progress_callback(cfg: StudyConfig):
    failures = {"in_a_row": 0}

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        finished = count_finished(study)
        params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        detail = {
            TrialState.COMPLETE: lambda: f"{cfg.study.objective} {trial.value:.4f}",
            TrialState.PRUNED: lambda: f"pruned at epoch {len(trial.user_attrs.get('history', []))}",
            TrialState.FAIL: lambda: f"failed: {trial.user_attrs.get('error', 'see the log above')}",
        }.get(trial.state, lambda: trial.state.name)()
        seconds = trial.user_attrs.get("train_seconds", 0.0)
        best = f"best {study.best_value:.4f} (#{study.best_trial.number})" if finished and _has_complete(study) else "no complete trial yet"
        log.info("trial %d [%d/%d finished] %s -> %s in %.0f s; %s", trial.number, finished, cfg.study.n_trials, params, detail, seconds, best)
        failures["in_a_row"] = failures["in_a_row"] + 1 if trial.state == TrialState.FAIL else 0
        if failures["in_a_row"] >= MAX_CONSECUTIVE_FAILURES:
            log.error("%d trials failed in a row; stopping the study (see the errors above)", MAX_CONSECUTIVE_FAILURES)
            study.stop()
        if finished >= cfg.study.n_trials:
            study.stop()

    return callback


def _raise_if_failing(study: optuna.Study) -> None:
    """A run that ended on a streak of failed trials is an error, not a finished study."""
    last = study.get_trials(deepcopy=False)[-MAX_CONSECUTIVE_FAILURES:]
    if len(last) == MAX_CONSECUTIVE_FAILURES and all(t.state == TrialState.FAIL for t in last):
        reason = last[-1].user_attrs.get("error", "see the log")
        raise RuntimeError(f"study {study.study_name!r} stopped: {MAX_CONSECUTIVE_FAILURES} trials failed in a row (last: {reason})")


def _has_complete(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def reproduce_command(cfg: StudyConfig) -> str:
    """The command that runs this study again, overrides included."""
    args = {
        "--config": cfg.source, "--data": cfg.data.path, "--study-name": cfg.study.name, "--storage": cfg.study.storage,
        "--n-trials": cfg.study.n_trials, "--sampler-seed": cfg.study.sampler_seed,
    }
    return "python -m flows.study " + " ".join(f"{k} {shlex.quote(str(v))}" for k, v in args.items())


def preflight(cfg: StudyConfig) -> None:
    """Check what a study needs before it starts: the dataset opens, the storage answers, the
    weights can be had. Each failure names the path, URL or weights at fault.

    Raises:
        DatasetError, ValueError, WeightsUnavailableError
    """
    open_index(cfg)
    create_storage(cfg.study.storage, cfg.study.heartbeat_s)
    if cfg.train.weights != "none":
        build_model(2, cfg.train.weights, 0, progress=True)  # downloads into torchvision's cache once


def run_study(cfg: StudyConfig, prepared: PreparedData | None = None, device: str | None = None) -> optuna.Study:
    """Run (or resume) the study until it has ``n_trials`` finished trials or times out.

    Returns:
        The study; its storage holds every trial, its results folder the resolved config.
    """
    prepared = prepared or prepare_data(cfg)
    dev = runtime.select_device(device or cfg.study.device)
    runtime.configure(dev)
    study = open_study(cfg)
    _fail_stale_trials(study, cfg)  # trials of workers that died: failed (and retried)
    _record_run(study, cfg, prepared, dev)
    remaining = cfg.study.n_trials - count_finished(study)
    if remaining <= 0:
        log.info("study %r already has %d finished trials; nothing to run", cfg.study.name, count_finished(study))
        return study
    log.info("study %r: %d trial(s) to run on %s (storage %s)", cfg.study.name, remaining, runtime.describe(dev), cfg.study.storage)
    objective = Objective(cfg, prepared, dev)
    study.optimize(
        objective,
        n_trials=2 * remaining + MAX_CONSECUTIVE_FAILURES,  # failed trials are replaced; the callback stops at n_trials
        timeout=cfg.study.timeout_s or None,
        catch=(NonFiniteLossError, torch.OutOfMemoryError, SurplusTrial),
        callbacks=[_progress_callback(cfg)],
        gc_after_trial=True,
    )
    _raise_if_failing(study)
    if objective.weights is not None:
        study.set_user_attr("weights", vars(objective.weights))
    return study


def _fail_stale_trials(study: optuna.Study, cfg: StudyConfig, poll_s: float = 0.5) -> None:
    """Fail (and queue again) the trials of dead workers; when running trials are all that make
    the study look full, give them one grace period first.

    A worker killed moments ago leaves its trial RUNNING until its heartbeat is
    ``2 x heartbeat_s`` old. Restarted at once, the study would count that trial as running and
    stop as full, one trial short. Waiting one grace period settles it: the trial finishes (a
    live worker), or its heartbeat goes stale and it is failed and queued again (a dead one).
    """
    n = cfg.study.n_trials
    deadline = time.monotonic() + 2 * cfg.study.heartbeat_s + poll_s
    told = False
    while True:
        optuna.storages.fail_stale_trials(study)
        finished = count_finished(study)
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished >= n or finished + running < n or time.monotonic() > deadline:
            return
        if not told:
            log.info(
                "study %r: %d finished, %d running elsewhere; waiting up to %ds for a killed worker's trial to go stale",
                cfg.study.name, finished, running, 2 * cfg.study.heartbeat_s,
            )
            told = True
        time.sleep(poll_s)


def _record_run(study: optuna.Study, cfg: StudyConfig, prepared: PreparedData, dev: torch.device) -> None:
    cfg.result_dir.mkdir(parents=True, exist_ok=True)
    (cfg.result_dir / "config.json").write_text(cfg.to_json())
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("dataset", prepared.summary(cfg))
    study.set_user_attr("command", reproduce_command(cfg))
    runs = list(study.user_attrs.get("runs", []))
    runs.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": runtime.describe(dev), "argv": sys.argv})
    study.set_user_attr("runs", runs[-50:])


# --------------------------------------------------------------------------- holdout


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return sorted(done, key=lambda t: (-t.value, t.number))[:k]


def score_holdout(study: optuna.Study, cfg: StudyConfig, prepared: PreparedData, device: str | None = None) -> dict | None:
    """Score the best trials' kept checkpoints on the holdout; prune the checkpoints to policy.

    Each top trial gets a ``holdout`` summary attribute; the best one's full scores
    (confusion matrix, per-class report, misclassified examples) go to the study's
    ``holdout`` attribute. Returns those full scores, or None without a scorable trial.
    """
    from .metrics import top_confused_pairs

    dev = runtime.select_device(device or cfg.study.device)
    cache = prepared.cache
    splits = make_splits(cache, cfg.train.train_ratio, cfg.data.holdout_fraction, cfg.data.split_seed)
    if len(splits.holdout) == 0:
        log.warning("the study has no holdout (holdout_fraction = 0 and no test/ folder); skipping holdout scores")
        return None
    data = DeviceData(cache, dev)
    # Earlier runs' scores stay: their checkpoints may be gone, their results are not.
    summaries: dict[str, dict] = dict(study.user_attrs.get("holdout_top", {}))
    best_detail = None
    for rank, trial in enumerate(top_trials(study, cfg.study.report_top_k)):
        path = trial.user_attrs.get("checkpoint")
        if not path or not Path(path).is_file():
            continue
        model, _ = load_checkpoint(path, dev)
        result = evaluate(model, data, splits.holdout, dev)
        scores = result.scores(cache.num_classes)
        summaries[str(trial.number)] = scores.summary()
        if best_detail is None:
            pred = result.probs.argmax(1)
            wrong = np.flatnonzero(pred != result.labels)
            wrong = wrong[np.argsort(-result.probs[wrong, pred[wrong]], kind="stable")]  # most confident first
            best_detail = {
                "trial": trial.number,
                "rank": rank,
                **scores.to_dict(),
                "confused_pairs": top_confused_pairs(scores.confusion, cache.class_names, 20),
                "misclassified": [
                    {"row": int(splits.holdout[i]), "true": int(result.labels[i]), "pred": int(pred[i]), "p": float(result.probs[i, pred[i]])}
                    for i in wrong[:200]
                ],
            }
        del model
    runtime.release_memory(dev)
    study.set_user_attr("holdout_top", summaries)
    if best_detail is not None:
        study.set_user_attr("holdout", best_detail)
        _prune_checkpoints(study, cfg, best_detail["trial"])
    return best_detail


def _prune_checkpoints(study: optuna.Study, cfg: StudyConfig, best_number: int) -> None:
    if cfg.study.keep_checkpoints != "all":
        for trial in study.get_trials(deepcopy=False):
            if trial.number != best_number:
                _drop_checkpoint(trial)
    best = checkpoint_dir(cfg) / f"trial_{best_number:04d}.pt"
    if best.is_file():
        shutil.copyfile(best, cfg.result_dir / "best.pt")


def results_table(study: optuna.Study, k: int = 10) -> list[dict]:
    """The top trials as plain rows (used by flow artifacts and the console)."""
    rows = []
    holdout = study.user_attrs.get("holdout_top", {})
    for t in top_trials(study, k):
        hold = holdout.get(str(t.number)) or {}
        rows.append({
            "trial": t.number,
            **{k_: _fmt(v) for k_, v in t.params.items()},
            "val": round(t.value, 4),
            "holdout_acc": round(hold["accuracy"], 4) if hold else None,
            "seconds": round(t.user_attrs.get("train_seconds", 0.0), 1),
        })
    return rows

