"""Running a study: storage, sampler, pruner, starting design, resume, stale trials of dead workers, progress."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .. import runtime, workers
from ..config import BACKBONE_DEFAULTS, StudyConfig
from ..model import build_model
from . import attrs, ranking
from .attrs import FINISHED, fmt_param
from .dataset import DecodedData, decode_dataset, open_index
from .design import enqueue_design
from .objective import TRIAL_FAILURES, Objective, is_refused
from .pruning import build_pruner, describe_pruning

# Heartbeats, stale-trial retries, multivariate TPE and the importance plot are Optuna features
# marked experimental; they are used knowingly, so their notices are not the user's business.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

log = logging.getLogger(__name__)


#: A study stops after this many failures in a row: something is wrong beyond one trial.
MAX_CONSECUTIVE_FAILURES = 5


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
        raise ValueError(
            f"cannot open Optuna storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None


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


def _progress_callback(cfg: StudyConfig, on_trial_end: Callable[[int], None] | None = None):
    failures = {"in_a_row": 0}

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        finished = count_finished(study)
        if on_trial_end is not None:
            on_trial_end(finished)
        params = " ".join(f"{k}={fmt_param(v)}" for k, v in trial.params.items())
        params += " (starting design)" if trial.user_attrs.get(attrs.TRIAL_DESIGN) is not None else ""
        detail = {
            TrialState.COMPLETE: lambda: f"{cfg.study.objective} {trial.value:.4f}",
            TrialState.PRUNED: lambda: f"pruned at epoch {len(trial.user_attrs.get(attrs.TRIAL_HISTORY, []))}",
            TrialState.FAIL: lambda: f"failed: {trial.user_attrs.get(attrs.TRIAL_ERROR, 'see the log above')}",
        }.get(trial.state, lambda: trial.state.name)()
        seconds = trial.user_attrs.get(attrs.TRIAL_TRAIN_SECONDS, 0.0)
        best = _best_text(study)
        failed = trial.state == TrialState.FAIL and not is_refused(trial)  # a refused one is routine
        log.log(
            logging.WARNING if failed else logging.INFO,
            "trial %d [%d/%d finished] %s -> %s in %.0f s; %s",
            trial.number,
            finished,
            cfg.study.n_trials,
            params,
            detail,
            seconds,
            best,
        )
        if trial.state != TrialState.FAIL:
            failures["in_a_row"] = 0
        elif not is_refused(trial):  # a refused trial never trained: it neither breaks nor extends a streak
            failures["in_a_row"] += 1
        if failures["in_a_row"] >= MAX_CONSECUTIVE_FAILURES:
            log.error("%d trials failed in a row; stopping the study (see the errors above)", MAX_CONSECUTIVE_FAILURES)
            study.stop()
        if finished >= cfg.study.n_trials:
            study.stop()

    return callback


def _raise_if_failing(study: optuna.Study) -> None:
    """A run that ended on a streak of failed trials is an error, not a finished study."""
    last = [t for t in study.get_trials(deepcopy=False) if not is_refused(t)][-MAX_CONSECUTIVE_FAILURES:]
    if len(last) == MAX_CONSECUTIVE_FAILURES and all(t.state == TrialState.FAIL for t in last):
        reason = last[-1].user_attrs.get(attrs.TRIAL_ERROR, "see the log")
        raise RuntimeError(
            f"study {study.study_name!r} stopped: {MAX_CONSECUTIVE_FAILURES} trials failed in a row (last: {reason})"
        )


def _best_text(study: optuna.Study) -> str:
    """The best trial so far as the ranking sees it (``ranking``: on the common validation subset)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return "no complete trial yet"
    best = ranking.rank(done, 1)[0]
    where = "on the common validation subset" if ranking.on_common_subset(done) else "on its validation split"
    return f"best #{best.number}: {ranking.ranking_key(done)(best):.4f} {where}"


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


def run_study(
    cfg: StudyConfig,
    dataset: DecodedData | None = None,
    device: str | None = None,
    command: str | None = None,
    save_config: bool = True,
    on_trial_end: Callable[[int], None] | None = None,
) -> optuna.Study:
    """Run (or resume) the study until it has ``n_trials`` finished trials or times out.

    Args:
        save_config: write the resolved study file to the results folder (a worker of a fan-out,
            whose settings carry its own device and share of memory, leaves the parent's).
        on_trial_end: called with the study's finished-trial count after each trial (progress).

    Returns:
        The study; its storage holds every trial, its results folder the resolved config.
    """
    dataset = dataset or decode_dataset(cfg)
    dev = runtime.select_device(device or cfg.study.device)
    runtime.configure(dev)
    study = open_study(cfg)
    _fail_stale_trials(study, cfg)  # trials of workers that died: failed (and retried)
    _record_run(study, cfg, dataset, runtime.describe(dev), command, save_config)
    remaining = cfg.study.n_trials - count_finished(study)
    if remaining <= 0:
        log.info("study %r already has %d finished trials; nothing to run", cfg.study.name, count_finished(study))
        return study
    log.info(
        "study %r: %d trial(s) to run on %s (storage %s)",
        cfg.study.name,
        remaining,
        runtime.describe(dev),
        cfg.study.storage,
    )
    objective = Objective(cfg, dataset, dev)
    study.set_user_attr(attrs.STUDY_EFFECTIVE_SETTINGS, effective_settings(cfg, objective.weights.pretrained))
    study.set_user_attr(attrs.STUDY_COMMON_SUBSET, objective.common_subset)
    enqueue_design(study, cfg)
    study.optimize(
        objective,
        n_trials=2 * remaining + MAX_CONSECUTIVE_FAILURES,  # failed trials are replaced; the callback stops at n_trials
        timeout=cfg.study.timeout_s or None,
        catch=TRIAL_FAILURES,
        callbacks=[_progress_callback(cfg, on_trial_end)],
        gc_after_trial=False,  # runtime.release_memory ends each trial; a full collection costs ~0.3 s
    )
    _raise_if_failing(study)
    if objective.weights is not None:
        study.set_user_attr(attrs.STUDY_WEIGHTS, vars(objective.weights))
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
                cfg.study.name,
                finished,
                running,
                2 * cfg.study.heartbeat_s,
            )
            told = True
        time.sleep(poll_s)


def start_study(cfg: StudyConfig, dataset: DecodedData, workers: int, command: str | None = None) -> optuna.Study:
    """Open (or create) the study and record the run and its resolved config, training nothing:
    the parent of a fan-out, before its ``workers`` start."""
    study = open_study(cfg)
    _record_run(study, cfg, dataset, f"{workers} workers", command)
    return study


def _record_run(
    study: optuna.Study,
    cfg: StudyConfig,
    dataset: DecodedData,
    device: str,
    command: str | None,
    save_config: bool = True,
) -> None:
    if save_config:
        cfg.result_dir.mkdir(parents=True, exist_ok=True)
        (cfg.result_dir / "config.json").write_text(cfg.to_json())
        (cfg.result_dir / "config.toml").write_text(cfg.to_toml())
        study.set_user_attr(attrs.STUDY_CONFIG, cfg.to_dict())
    study.set_user_attr(attrs.STUDY_DATASET, dataset.summary(cfg))
    study.set_user_attr(attrs.STUDY_PRUNING, describe_pruning(cfg))
    if command:
        study.set_user_attr(attrs.STUDY_COMMAND, command)
    runs = list(study.user_attrs.get(attrs.STUDY_RUNS, []))
    runs.append(
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": device,
            "argv": sys.argv,
            **workers.identity(),
        }
    )
    study.set_user_attr(attrs.STUDY_RUNS, runs[-50:])


def effective_settings(cfg: StudyConfig, pretrained: bool) -> dict:
    """The backbone-dependent ``[train]`` keys as this study trains them: key -> value and source."""
    resolved = cfg.train.for_backbone(pretrained)
    backbone = "a pretrained" if pretrained else "a randomly initialised"
    settings = {}
    for key in BACKBONE_DEFAULTS:
        if key in cfg.search.space:
            settings[key] = {"value": cfg.search.space[key], "source": "searched"}
        elif getattr(cfg.train, key) is None:
            settings[key] = {"value": getattr(resolved, key), "source": f"default for {backbone} backbone"}
        else:
            settings[key] = {"value": getattr(resolved, key), "source": "study file"}
    return settings
