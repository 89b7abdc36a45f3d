"""Pruning that compares like with like (DESIGN decision 7; README, "Pruning").

Each trial's lr schedule (warm-up, then cosine to zero) is stretched over its own ``epochs``:
epoch 3 of a 3-epoch trial is the end of its schedule, epoch 3 of a 30-epoch trial a tenth of
it. So a trial reports epoch ``e`` of ``E`` at its *progress*, on the grid of the longest
schedule the study can plan (``R``, ``space.max_epochs``)::

    step = round(e / E * R)        (half up; a trial of R epochs reports epoch e at step e)

and the pruners count in those steps: the median pruner compares a trial with the complete
trials at the same step, i.e. at the same share of their own schedules (to within half an epoch
of the longest one); ``pruner_warmup_epochs`` is a number of steps; Hyperband's rungs are steps
up to ``max_resource = R``. A trial is never pruned after its first epoch, inside its lr
warm-up, or after its last epoch (it finished its plan: it is COMPLETE), and a starting-design
trial (``design``) is never pruned.
"""

from __future__ import annotations

import optuna

from ..config import StudyConfig, TrainSection
from . import attrs
from .space import max_epochs

#: Median pruner: complete trials needed before any pruning, and at the compared step.
MEDIAN_STARTUP_TRIALS = 3
MEDIAN_MIN_TRIALS = 3
#: Hyperband: each rung keeps a third of the trials that reach it.
HYPERBAND_REDUCTION = 3


def build_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """The study's pruner, counting in progress steps (``progress_step``)."""
    if cfg.study.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.study.pruner == "hyperband":
        # max_resource fixed to R: "auto" takes the first complete trial's last step (optuna #1220).
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max_epochs(cfg), reduction_factor=HYPERBAND_REDUCTION
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=MEDIAN_STARTUP_TRIALS,
        n_warmup_steps=cfg.study.pruner_warmup_epochs,
        n_min_trials=MEDIAN_MIN_TRIALS,
    )


def progress_step(epoch: int, epochs: int, longest: int) -> int:
    """The step of epoch ``epoch`` of an ``epochs``-epoch trial: ``round(epoch / epochs * longest)``,
    half up, in integers (distinct for every epoch, as ``longest >= epochs``)."""
    longest = max(longest, epochs)
    return (2 * epoch * longest + epochs) // (2 * epochs)


def may_prune(epoch: int, s: TrainSection) -> bool:
    """Whether a trial may be pruned after ``epoch``: not its first, not inside its lr warm-up,
    not its last (a trial that ends its planned epochs is complete)."""
    return 1 < epoch < s.epochs and epoch > s.warmup_epochs


def report_epoch(trial: optuna.trial.BaseTrial, value: float, epoch: int, s: TrainSection, longest: int) -> None:
    """Report one epoch's validation value at its progress step, then prune if the pruner says so
    and ``may_prune`` allows it (starting-design trials never).

    Raises:
        optuna.TrialPruned: the trial is to stop here.
    """
    if not isinstance(trial, optuna.Trial):  # a FixedTrial has no study to report to
        return
    step = progress_step(epoch, s.epochs, longest)
    trial.report(value, step)
    if not may_prune(epoch, s) or trial.user_attrs.get(attrs.TRIAL_DESIGN) is not None:
        return
    if trial.should_prune():
        raise optuna.TrialPruned(
            f"pruned after epoch {epoch} of {s.epochs} (progress step {step} of {max(longest, s.epochs)}, value {value:.4f})"
        )


def describe_pruning(cfg: StudyConfig) -> str:
    """The pruning rule of this configuration, in one line (study attr ``pruning``, for the report)."""
    if cfg.study.pruner == "none":
        return "no pruning: every trial runs all its epochs"
    longest = max_epochs(cfg)
    if cfg.study.pruner == "hyperband":
        who = (
            f"Hyperband (rungs at steps 1 to {longest}, reduction factor {HYPERBAND_REDUCTION}) stops a trial "
            "outside the best third of those at its rung"
        )
    else:
        who = (
            f"The median pruner stops a trial whose best value is below the median of the complete trials at its step "
            f"(at least {MEDIAN_MIN_TRIALS}), from step {cfg.study.pruner_warmup_epochs} on"
        )
    return (
        f"Trials are compared at equal progress of their own lr schedules: epoch e of an E-epoch trial is step "
        f"round(e / E x {longest}) ({longest} = the most epochs a trial plans). {who}. No trial is pruned after its "
        "first epoch, inside its lr warm-up or after its last epoch (it is then complete), nor any starting-design trial."
    )
