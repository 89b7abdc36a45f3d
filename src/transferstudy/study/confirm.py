"""The confirmation stage (DESIGN decision 7): the honest answer to "which depth?".

    summary = confirm_study(study, cfg, dataset)   # after run_study; python -m flows.study runs it

A search's best trial per depth is the luckiest of its depth's trials, each a single run on its
own split. So after the search, the best complete trial of each depth in ``[confirm] depths``
(ranked as ``ranking`` ranks: on the common validation subset) is trained again with
``[confirm] seeds`` fresh train seeds (``train_seed + 1`` on: none repeats the search run it was
picked from), every depth at one common train_ratio, the largest searched, so every depth trains
on the same images. Each run is scored on the common validation subset (the validation split at
that ratio, which it did not train on) and on the scored holdout rows
(``DecodedData.holdout_rows``). The holdout selects nothing here either: it is reported only.

With ``[confirm] train_ratios`` the best trial's setting is also trained at each of those ratios
with the same seeds (a learning curve), every run scored on the validation split of the largest
ratio of the sweep and the search, which no run of the sweep trains on.

The runs are trials of the sibling study ``<study>-confirm`` in the same storage, each tagged with
its plan entry ``{"depth", "seed", "train_ratio", "source"}`` (``attrs.TRIAL_CONFIRM``). The plan
is deterministic, so a resumed study runs only the entries without a complete trial; runs of a
killed process go stale and are retried as in the search. The study attr ``confirmation``
(``attrs.STUDY_CONFIRM``) holds, per depth and per sweep ratio, n and the mean with its 95% t
interval over seeds of the common-subset metric and of the holdout accuracy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import runtime
from ..config import SEARCHABLE, StudyConfig, TrainSection
from ..splits import common_validation
from ..stats import LEVEL, mean_interval
from ..train import evaluate
from . import attrs, ranking
from .dataset import DecodedData
from .objective import TRIAL_FAILURES, is_refused, record_metric, refuse, study_runner, subset_score
from .runner import create_storage
from .space import largest_train_ratio, searched_depths

log = logging.getLogger(__name__)

DEPTH = "unfreeze_depth"
#: Accuracy and macro-F1 lie in [0, 1]: an interval over few seeds is cut there.
SCORE_BOUNDS = (0.0, 1.0)


@dataclass(frozen=True)
class Run:
    """One planned confirmation run: a search trial's setting at a train_ratio, with a seed."""

    depth: int
    seed: int
    train_ratio: float
    source: FrozenTrial  # the search trial whose searched values are retrained

    @property
    def entry(self) -> dict:
        """The plan entry stored with the run's trial (``attrs.TRIAL_CONFIRM``)."""
        return {"depth": self.depth, "seed": self.seed, "train_ratio": self.train_ratio, "source": self.source.number}

    @property
    def params(self) -> dict:
        return {**self.source.params, "train_ratio": self.train_ratio}

    def settings(self, cfg: StudyConfig) -> TrainSection:
        return cfg.train.with_params({**self.params, "train_seed": self.seed})


def entry_key(entry: dict) -> tuple:
    return entry["depth"], entry["seed"], round(float(entry["train_ratio"]), 9), entry["source"]


@dataclass
class Plan:
    """What the confirmation trains: the sources, the ratios, the seeds, and every run once."""

    sources: dict[int, FrozenTrial]  # depth -> the best complete search trial of that depth
    missing_depths: list[int]  # depths to confirm without a complete search trial
    best: FrozenTrial  # the best search trial: the sweep's setting
    best_depth: int
    on_common: bool  # the search trials are ranked on the common subset (else on their values)
    depth_ratio: float  # every depth trains at this ratio; its validation split is the common subset
    sweep_ratios: list[float]
    sweep_ratio: float  # the largest of the sweep and the search: its validation split scores the sweep
    seeds: list[int]

    def depth_runs(self, depth: int) -> list[Run]:
        return [Run(depth, seed, self.depth_ratio, self.sources[depth]) for seed in self.seeds]

    def sweep_runs(self, ratio: float) -> list[Run]:
        return [Run(self.best_depth, seed, ratio, self.best) for seed in self.seeds]

    @property
    def runs(self) -> dict[tuple, Run]:
        """Every run once, by plan key (a sweep run at the depth ratio is the best depth's run)."""
        runs = [r for d in self.sources for r in self.depth_runs(d)]
        runs += [r for ratio in self.sweep_ratios for r in self.sweep_runs(ratio)]
        return {entry_key(r.entry): r for r in runs}


def make_plan(search: list[FrozenTrial], cfg: StudyConfig) -> Plan:
    """The confirmation plan of the study's complete ``search`` trials (at least one)."""
    ranked = ranking.rank(search)
    depth_of = lambda t: t.params.get(DEPTH, cfg.train.unfreeze_depth)  # noqa: E731
    best_of: dict[int, FrozenTrial] = {}
    for t in ranked:
        best_of.setdefault(depth_of(t), t)
    depths = cfg.confirm.depths or searched_depths(cfg)
    ratio = largest_train_ratio(cfg)
    return Plan(
        sources={d: best_of[d] for d in depths if d in best_of},
        missing_depths=[d for d in depths if d not in best_of],
        best=ranked[0],
        best_depth=depth_of(ranked[0]),
        on_common=ranking.on_common_subset(search),
        depth_ratio=ratio,
        sweep_ratios=list(cfg.confirm.train_ratios),
        sweep_ratio=max([ratio, *cfg.confirm.train_ratios]),
        seeds=[cfg.train.train_seed + i for i in range(1, cfg.confirm.seeds + 1)],
    )


def open_confirm_study(cfg: StudyConfig) -> optuna.Study:
    """The sibling study ``<study>-confirm`` (created, or loaded to resume)."""
    return optuna.create_study(
        study_name=cfg.study.name + attrs.CONFIRM_SUFFIX,
        storage=create_storage(cfg.study.storage, cfg.study.heartbeat_s),
        sampler=optuna.samplers.RandomSampler(seed=cfg.study.sampler_seed),  # never asked: every value is fixed
        pruner=optuna.pruners.NopPruner(),
        direction="maximize",
        load_if_exists=True,
    )


def confirm_study(
    study: optuna.Study, cfg: StudyConfig, dataset: DecodedData, device: str | None = None
) -> dict | None:
    """Run the confirmation runs the study still needs and store its summary (study attr ``confirmation``).

    Returns:
        The summary, or None when ``[confirm] enabled`` is false, the study has no complete
        trial, or the common validation subset is empty.
    """
    if not cfg.confirm.enabled:
        log.info("confirmation skipped: [confirm] enabled = false")
        return None
    search = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not search:
        log.warning("confirmation skipped: the study has no complete trial")
        return None
    plan = make_plan(search, cfg)
    for depth in plan.missing_depths:
        log.warning("confirmation: depth %d has no complete search trial; it is not confirmed", depth)
    objective = ConfirmObjective(cfg, dataset, plan)
    if len(objective.sweep_rows) == 0:
        log.warning("confirmation skipped: the validation split at train_ratio %.3g is empty", plan.sweep_ratio)
        return None
    confirm = open_confirm_study(cfg)
    optuna.storages.fail_stale_trials(confirm)  # runs of a killed process: failed, and queued again
    waiting = enqueue_missing(confirm, plan)
    if waiting:
        log.info(
            "confirmation: %d run(s) to train (%d planned) in study %r", waiting, len(plan.runs), confirm.study_name
        )
        objective.start(device or cfg.study.device, search[0].user_attrs.get(attrs.TRIAL_WEIGHTS, cfg.train.weights))
        try:
            confirm.optimize(
                objective,
                n_trials=waiting,
                catch=TRIAL_FAILURES,
                callbacks=[_progress],
                gc_after_trial=False,  # runtime.release_memory ends each trial; a full collection costs ~0.3 s
            )
        finally:
            objective.stop()
    summary = summarize(confirm, plan, cfg, objective)
    study.set_user_attr(attrs.STUDY_CONFIRM, summary)
    return summary


def enqueue_missing(confirm: optuna.Study, plan: Plan) -> int:
    """Enqueue the plan's runs without a complete, waiting or running trial; return how many wait."""
    held = {
        entry_key(t.user_attrs[attrs.TRIAL_CONFIRM])
        for t in confirm.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
        )
        if attrs.TRIAL_CONFIRM in t.user_attrs
    }
    for key, run in plan.runs.items():
        if key not in held:
            confirm.enqueue_trial(run.params, user_attrs={attrs.TRIAL_CONFIRM: run.entry})
    return len(confirm.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


class ConfirmObjective:
    """Trains one plan entry per trial and scores it on the common subsets and the holdout."""

    def __init__(self, cfg: StudyConfig, dataset: DecodedData, plan: Plan):
        self.cfg, self.dataset, self.plan = cfg, dataset, plan
        self.metric = record_metric(cfg.study.objective)
        split = (cfg.data.holdout_fraction, cfg.data.split_seed)
        self.common_rows = common_validation(dataset.cache, plan.depth_ratio, *split)
        self.sweep_rows = common_validation(dataset.cache, plan.sweep_ratio, *split)
        self.holdout_rows = dataset.holdout_rows(cfg).scored
        self.runner = None

    def start(self, device: str, weights: str) -> None:
        """Place the data and the backbone on the device, with the weights the search trained with."""
        self.device = runtime.select_device(device)
        runtime.configure(self.device)
        self.runner = study_runner(self.cfg, self.dataset, self.device, weights)

    def stop(self) -> None:
        self.runner = None
        runtime.release_memory(self.device)

    def __call__(self, trial: optuna.Trial) -> float:
        run = self._run_of(trial)
        for key, value in run.params.items():
            _fixed(trial, key, value, self.cfg)
        started = time.perf_counter()
        try:
            outcome = self.runner.run_trial(run.settings(self.cfg), monitor=self.metric)
        except Exception as exc:
            trial.set_user_attr(attrs.TRIAL_ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            trial.set_user_attr(attrs.TRIAL_TRAIN_SECONDS, time.perf_counter() - started)
        common = None
        if run.train_ratio <= self.plan.depth_ratio:  # a larger ratio trains on part of the common subset
            common = subset_score(outcome, self.runner.data, self.common_rows, self.metric, self.device)
        sweep = subset_score(outcome, self.runner.data, self.sweep_rows, self.metric, self.device)
        s = outcome.settings
        holdout = evaluate(
            outcome.model, self.runner.data, self.holdout_rows, self.device, s.eval_batch_size, s.autocast
        )
        for key, value in {
            attrs.TRIAL_HISTORY: [vars(r) for r in outcome.result.history],
            attrs.TRIAL_SPLIT_SIZES: outcome.splits.sizes(),
            attrs.TRIAL_DEVICE: runtime.describe(self.device),
            attrs.TRIAL_WEIGHTS: self.runner.weights.used,
            attrs.TRIAL_COMMON_VAL: common,
            attrs.TRIAL_SWEEP_VAL: sweep,
            attrs.TRIAL_HOLDOUT_ACCURACY: holdout.accuracy if len(self.holdout_rows) else None,
        }.items():
            trial.set_user_attr(key, value)
        return sweep  # every run of the stage excludes the sweep's rows: one scale for all its trials

    def _run_of(self, trial: optuna.Trial) -> Run:
        """The plan entry this trial trains; a stale entry (the search's best trials changed since it
        was enqueued) or one another trial already completed is refused."""
        entry = trial.user_attrs.get(attrs.TRIAL_CONFIRM)
        run = self.plan.runs.get(entry_key(entry)) if entry else None
        if run is None:
            refuse(trial, f"confirmation entry {entry} is not in the current plan")
        done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        twin = next((t.number for t in done if t.user_attrs.get(attrs.TRIAL_CONFIRM) == entry), None)
        if twin is not None:
            refuse(trial, f"trial #{twin} already ran confirmation entry {entry}")
        return run


def _fixed(trial: optuna.Trial, key: str, value, cfg: StudyConfig) -> None:
    """Record a fixed value as a parameter (shown in the dashboard), with a distribution every trial
    of the stage shares: the searched choices, or a one-point range."""
    kind = SEARCHABLE.get(key)
    if kind == "choice":
        trial.suggest_categorical(key, cfg.search.space.get(key) or [value])
    elif kind == "int":
        trial.suggest_int(key, value, value)
    else:
        trial.suggest_float(key, value, value, log=kind == "log")


def _progress(study: optuna.Study, trial: FrozenTrial) -> None:
    entry = trial.user_attrs.get(attrs.TRIAL_CONFIRM) or {}
    what = f"depth {entry.get('depth')} seed {entry.get('seed')} at train_ratio {entry.get('train_ratio')}"
    if trial.state != TrialState.COMPLETE:
        log.log(
            logging.INFO if is_refused(trial) else logging.WARNING,
            "confirmation run %d (%s) %s: %s",
            trial.number,
            what,
            trial.state.name.lower(),
            trial.user_attrs.get(attrs.TRIAL_ERROR, "see the log above"),
        )
        return
    common, hold = trial.user_attrs.get(attrs.TRIAL_COMMON_VAL), trial.user_attrs.get(attrs.TRIAL_HOLDOUT_ACCURACY)
    log.info(
        "confirmation run %d (%s): common subset %s, holdout accuracy %s, in %.0f s",
        trial.number,
        what,
        "—" if common is None else f"{common:.4f}",
        "—" if hold is None else f"{hold:.4f}",
        trial.user_attrs.get(attrs.TRIAL_TRAIN_SECONDS, 0.0),
    )


def summarize(confirm: optuna.Study, plan: Plan, cfg: StudyConfig, objective: ConfirmObjective) -> dict:
    """The stage's answer (study attr ``confirmation``): per depth and per sweep ratio, n and the mean
    with its 95% t interval over seeds of the common-subset metric and of the holdout accuracy."""
    trials = confirm.get_trials(deepcopy=False)
    done = {
        entry_key(t.user_attrs[attrs.TRIAL_CONFIRM]): t
        for t in trials
        if t.state == TrialState.COMPLETE and attrs.TRIAL_CONFIRM in t.user_attrs
    }

    def group(runs: list[Run], score: str) -> dict:
        found = [done[k] for k in (entry_key(r.entry) for r in runs) if k in done]
        return {
            "planned": len(runs),
            "trials": [t.number for t in found],
            "metric": mean_interval([t.user_attrs.get(score) for t in found], bounds=SCORE_BOUNDS),
            "holdout_accuracy": mean_interval(
                [t.user_attrs.get(attrs.TRIAL_HOLDOUT_ACCURACY) for t in found], bounds=SCORE_BOUNDS
            ),
        }

    def source(t: FrozenTrial) -> dict:
        return {
            "source_trial": t.number,
            "params": dict(t.params),
            "search_value": ranking.ranking_value(t.value, t.user_attrs, plan.on_common),
        }

    depths = [
        {"depth": d, **source(t), **group(plan.depth_runs(d), attrs.TRIAL_COMMON_VAL)} for d, t in plan.sources.items()
    ]
    sweep = None
    if plan.sweep_ratios:
        sweep = {
            "depth": plan.best_depth,
            **source(plan.best),
            "common_ratio": plan.sweep_ratio,
            "common_rows": len(objective.sweep_rows),
            "points": [
                {"train_ratio": r, **group(plan.sweep_runs(r), attrs.TRIAL_SWEEP_VAL)} for r in plan.sweep_ratios
            ],
        }
    keys = set(plan.runs)
    mine = [
        t
        for t in trials
        if attrs.TRIAL_CONFIRM in t.user_attrs and entry_key(t.user_attrs[attrs.TRIAL_CONFIRM]) in keys
    ]
    return {
        "study": confirm.study_name,
        "metric": cfg.study.objective,
        "level": LEVEL,
        "interval": "t interval over seeds (mean +- t(n-1) sd / sqrt(n))",
        "seeds": plan.seeds,
        "train_ratio": plan.depth_ratio,
        "common_rows": len(objective.common_rows),
        "holdout_rows": len(objective.holdout_rows),
        "ranked_on": "common subset" if plan.on_common else "trial value",
        "depths": depths,
        "missing_depths": plan.missing_depths,
        "searched_depths": searched_depths(cfg),
        "sweep": sweep,
        "runs": {
            "planned": len(keys),
            "complete": sum(1 for k in keys if k in done),
            "failed": sum(1 for t in mine if t.state == TrialState.FAIL and not is_refused(t)),
        },
    }
