"""Pruning compares trials at equal progress of their own schedules (study/pruning.py).

Scripted objectives report hand-written validation curves through ``report_epoch``, the helper
the real objective calls after every epoch; no network is trained. Curves are dyadic fractions,
so equal progress gives bit-equal values.
"""

import optuna
import pytest
from optuna.trial import TrialState

from transferstudy.config import TrainSection, from_dict
from transferstudy.study import attrs
from transferstudy.study.pruning import build_pruner, describe_pruning, progress_step, report_epoch

LONGEST = 8  # the most epochs a trial of these studies plans


@pytest.fixture
def study():
    cfg = from_dict({"study": {"pruner": "median"}, "search": {"epochs": [2, LONGEST]}}, source="pruning.toml")
    return optuna.create_study(direction="maximize", pruner=build_pruner(cfg))


def rising(epochs: int) -> list[float]:
    """A curve that reaches e / epochs after epoch e: the same at the same share of any schedule."""
    return [e / epochs for e in range(1, epochs + 1)]


def run(study, values, warmup_epochs=0.0, user_attrs=None) -> optuna.trial.FrozenTrial:
    """One scripted trial of ``len(values)`` epochs, reported as the objective reports them."""
    settings = TrainSection(epochs=len(values), warmup_epochs=warmup_epochs)
    if user_attrs:
        study.enqueue_trial({}, user_attrs=user_attrs)

    def objective(trial):
        for epoch, value in enumerate(values, 1):
            report_epoch(trial, value, epoch, settings, LONGEST)
        return values[-1]

    study.optimize(objective, n_trials=1)
    return study.trials[-1]


def test_progress_steps_are_distinct_and_end_at_the_longest_schedule():
    assert [progress_step(e, 8, 8) for e in range(1, 9)] == list(range(1, 9))
    assert [progress_step(e, 4, 8) for e in range(1, 5)] == [2, 4, 6, 8]
    assert [progress_step(e, 3, 10) for e in range(1, 4)] == [3, 7, 10]  # 3.33, 6.67, 10
    assert [progress_step(e, 4, 6) for e in range(1, 5)] == [2, 3, 5, 6]  # 1.5 and 4.5 round up
    for longest in range(1, 31):
        for epochs in range(1, longest + 1):
            steps = [progress_step(e, epochs, longest) for e in range(1, epochs + 1)]
            assert steps == sorted(set(steps)) and steps[-1] == longest


@pytest.mark.parametrize("first, second", [(4, 8), (8, 4)])
def test_trials_that_differ_only_in_epochs_do_not_prune_each_other(study, first, second):
    for _ in range(3):
        assert run(study, rising(first)).state == TrialState.COMPLETE
    trial = run(study, rising(second))
    assert trial.state == TrialState.COMPLETE and trial.value == 1.0


def test_epoch_numbered_steps_would_prune_the_longer_schedule():
    # The control: the rule this module replaced (step = epoch) prunes the 8-epoch trial after
    # epoch 2, where it stands at a quarter of its schedule and the 4-epoch trials at half.
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_min_trials=3)
    )

    def by_epoch(values):
        def objective(trial):
            for epoch, value in enumerate(values, 1):
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return values[-1]

        study.optimize(objective, n_trials=1)
        return study.trials[-1]

    for _ in range(3):
        by_epoch(rising(4))
    assert by_epoch(rising(8)).state == TrialState.PRUNED


def test_a_trial_is_never_pruned_at_its_last_epoch(study):
    for _ in range(3):
        run(study, rising(4))
    trial = run(study, [0.25, 0.5, 0.75, 0.0])  # on the median until a terrible last epoch
    assert trial.state == TrialState.COMPLETE and trial.value == 0.0
    assert study.pruner.prune(study, trial)  # the pruner alone would have stopped it there


def test_never_pruned_at_the_first_epoch_nor_inside_the_warmup(study):
    for _ in range(3):
        run(study, rising(8))
    hopeless = [0.0] * 8
    after_one = optuna.trial.create_trial(value=0.0, intermediate_values={1: 0.0}, params={}, distributions={})
    assert study.pruner.prune(study, after_one)  # the pruner alone would stop it after epoch 1
    at_two = run(study, hopeless)
    assert at_two.state == TrialState.PRUNED and at_two.last_step == 2  # not after epoch 1
    after_warmup = run(study, hopeless, warmup_epochs=2.5)
    assert after_warmup.state == TrialState.PRUNED and after_warmup.last_step == 3  # not inside the warm-up


def test_a_clearly_worse_trial_is_pruned_at_a_comparable_point(study):
    for _ in range(3):
        run(study, rising(8))
    worse = run(study, [0.125, 0.25, 0.5, 0.5])  # 4 epochs, half the pace of the others
    assert worse.state == TrialState.PRUNED
    assert worse.last_step == 4  # after epoch 2 of 4, compared with epoch 4 of 8


def test_starting_design_trials_are_never_pruned(study):
    for _ in range(3):
        run(study, rising(8))
    design = run(study, [0.0] * 8, user_attrs={attrs.TRIAL_DESIGN: {"depth": 0, "round": 0}})
    assert design.state == TrialState.COMPLETE


def test_the_rule_is_written_for_the_report():
    cfg = from_dict({"study": {"pruner": "median"}, "search": {"epochs": [2, 12]}}, source="x.toml")
    text = describe_pruning(cfg)
    assert "round(e / E x 12)" in text and "last epoch" in text and "warm-up" in text and "\n" not in text
    assert "Hyperband" in describe_pruning(cfg.with_overrides(study={"pruner": "hyperband"}))
    assert describe_pruning(cfg.with_overrides(study={"pruner": "none"})).startswith("no pruning")
