"""The starting design: every searched unfreeze depth gets an answer (``[study] min_trials_per_depth``).

Before the sampler takes over, the study runs ``min_trials_per_depth`` trials at each searched
depth, enqueued in rounds. Round 0 puts every depth at the centre of the other searched
dimensions (geometric centre of a log range, midpoint of a linear one, the first listed choice);
each later round at one draw seeded by ``sampler_seed`` and the round. Inside a round only the
depth differs, so the design is itself a like-for-like depth comparison. Design trials count in
``n_trials`` and are never pruned (``pruning``): each ends COMPLETE unless it fails.

Enqueuing looks at the study first and adds only what is missing: a depth is covered by its
COMPLETE trials and by design trials still waiting or running. A resumed run or a later worker
enqueues nothing again, and a design trial that failed is replaced by the next round's. Two
workers that enqueue at the same instant may both add an entry: the later copy is refused when
it starts (``taken_by``), recorded as failed and not counted.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

import optuna
from optuna.trial import TrialState

from ..config import SEARCHABLE, StudyConfig
from . import attrs
from .attrs import FINISHED

log = logging.getLogger(__name__)

DEPTH = "unfreeze_depth"


def design_point(cfg: StudyConfig, round_: int) -> dict:
    """The searched values besides the depth of design round ``round_`` (the same for every depth)."""
    rng = random.Random(f"design:{cfg.study.sampler_seed}:{round_}")
    point = {}
    for key, spec in cfg.search.space.items():
        kind = SEARCHABLE[key]
        if key == DEPTH:
            continue
        if kind == "choice":
            point[key] = spec[0] if round_ == 0 else spec[rng.randrange(len(spec))]
            continue
        u = 0.5 if round_ == 0 else rng.random()
        low, high = spec
        if kind == "int":
            point[key] = low + min(high - low, int(u * (high - low + 1)))
        elif kind == "log":
            point[key] = min(high, max(low, math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))
        else:
            point[key] = low + u * (high - low)
    return point


def missing_entries(trials: list[optuna.trial.FrozenTrial], cfg: StudyConfig) -> list[dict]:
    """The design entries (``{"depth", "round"}``) the study still needs, round by round."""
    depths = cfg.search.space.get(DEPTH, [])
    covered: Counter = Counter()
    next_round: Counter = Counter()
    for t in trials:
        entry = t.user_attrs.get(attrs.TRIAL_DESIGN)
        if entry is not None:
            next_round[entry["depth"]] = max(next_round[entry["depth"]], entry["round"] + 1)
        if t.state == TrialState.COMPLETE or (
            entry is not None and t.state in (TrialState.WAITING, TrialState.RUNNING)
        ):
            covered[entry["depth"] if entry is not None else t.params.get(DEPTH)] += 1
    need = {d: max(0, cfg.study.min_trials_per_depth - covered[d]) for d in depths}
    rounds = max(need.values(), default=0)
    return [{"depth": d, "round": next_round[d] + i} for i in range(rounds) for d in depths if i < need[d]]


def enqueue_design(study: optuna.Study, cfg: StudyConfig) -> list[dict]:
    """Enqueue the design entries the study still needs, as many as ``n_trials`` leaves room for
    (one warning names the depths left out).

    Returns:
        The entries enqueued.
    """
    missing = missing_entries(study.get_trials(deepcopy=False), cfg)
    counted = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
    room = max(0, cfg.study.n_trials - len(counted))
    added, left = missing[:room], missing[room:]
    for entry in added:
        params = {DEPTH: entry["depth"], **design_point(cfg, entry["round"])}
        study.enqueue_trial(params, user_attrs={attrs.TRIAL_DESIGN: entry})
    if added:
        log.info("study %r: %d starting-design trial(s) enqueued first", cfg.study.name, len(added))
    if left:
        log.warning(
            "study %r: n_trials = %d leaves room for %d of the %d starting-design trials still needed "
            "(min_trials_per_depth = %d per searched depth); unfreeze depth(s) %s may end without a complete trial",
            cfg.study.name,
            cfg.study.n_trials,
            len(added),
            len(missing),
            cfg.study.min_trials_per_depth,
            sorted({e["depth"] for e in left}),
        )
    return added


def taken_by(trial: optuna.Trial) -> int | None:
    """The number of an earlier trial holding this trial's design entry (this one is then a copy
    enqueued twice by workers that started together), or None."""
    entry = trial.user_attrs.get(attrs.TRIAL_DESIGN)
    if entry is None:
        return None
    held = trial.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, *FINISHED))
    return next(
        (t.number for t in held if t.number < trial.number and t.user_attrs.get(attrs.TRIAL_DESIGN) == entry), None
    )
