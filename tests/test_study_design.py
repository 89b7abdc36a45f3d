"""Honest answers: every searched depth answered (study/design.py), defaults that fit the weights."""

import logging
import math

import optuna
import pytest
import torch
from helpers import tiny_config
from optuna.trial import TrialState

from transferstudy import study as study_mod
from transferstudy import trial as trial_mod
from transferstudy.config import TrainSection, from_dict, load_config
from transferstudy.study import attrs
from transferstudy.study.design import design_point, enqueue_design, taken_by
from transferstudy.train import build_optimizer


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo digits are written under ./studies/data


def _config(**study):
    search = {"unfreeze_depth": [0, 1, 2], "lr": [1e-3, 1e-2], "epochs": [1, 3], "optimizer": ["adamw", "sgd"]}
    return from_dict({"study": {"name": "design", **study}, "search": search}, source="design.toml")


def _design(trials):
    return [t.user_attrs[attrs.TRIAL_DESIGN] for t in trials if attrs.TRIAL_DESIGN in t.user_attrs]


def test_design_rounds_centre_then_seeded_draws():
    cfg = _config()
    centre = design_point(cfg, 0)
    assert set(centre) == {"lr", "epochs", "optimizer"}  # the depth is the entry's own
    assert (
        centre["lr"] == pytest.approx(math.sqrt(1e-3 * 1e-2))
        and centre["epochs"] == 2
        and centre["optimizer"] == "adamw"
    )
    drawn = design_point(cfg, 1)
    assert drawn == design_point(cfg, 1) and drawn != centre
    assert drawn != design_point(cfg.with_overrides(study={"sampler_seed": 1}), 1)
    for r in range(1, 20):
        point = design_point(cfg, r)
        assert 1e-3 <= point["lr"] <= 1e-2 and 1 <= point["epochs"] <= 3 and point["optimizer"] in ("adamw", "sgd")


def test_design_is_enqueued_once_and_only_what_n_trials_leaves_room_for(caplog):
    study = optuna.create_study(direction="maximize")
    cfg = _config(n_trials=2)
    with caplog.at_level(logging.WARNING, logger="transferstudy.study.design"):
        added = enqueue_design(study, cfg)
    assert added == [{"depth": 0, "round": 0}, {"depth": 1, "round": 0}]
    assert [r.getMessage() for r in caplog.records if "n_trials = 2" in r.getMessage() and "[2]" in r.getMessage()]
    assert enqueue_design(study, cfg.with_overrides(study={"n_trials": 6})) == [{"depth": 2, "round": 0}]
    assert enqueue_design(study, cfg.with_overrides(study={"n_trials": 6})) == []  # waiting entries cover their depths
    assert [t.system_attrs["fixed_params"]["unfreeze_depth"] for t in study.trials] == [0, 1, 2]
    two = cfg.with_overrides(study={"n_trials": 9, "min_trials_per_depth": 2})
    assert enqueue_design(study, two) == [{"depth": d, "round": 1} for d in (0, 1, 2)]
    assert enqueue_design(study, cfg.with_overrides(study={"min_trials_per_depth": 0})) == []


def test_a_failed_design_trial_is_replaced_by_the_next_round():
    study = optuna.create_study(direction="maximize")
    cfg = _config(n_trials=4)
    enqueue_design(study, cfg)
    for depth in (0, 1, 2):
        trial = study.ask()
        study.tell(
            trial, state=TrialState.FAIL if depth == 1 else TrialState.COMPLETE, values=None if depth == 1 else 0.5
        )
    assert enqueue_design(study, cfg) == [{"depth": 1, "round": 1}]


def test_a_second_copy_of_a_design_entry_is_refused():
    # Two workers that enqueued at the same instant: the later copy is refused when it starts.
    study = optuna.create_study(direction="maximize")
    entry = {"depth": 0, "round": 0}
    for _ in range(2):
        study.enqueue_trial({"unfreeze_depth": 0}, user_attrs={attrs.TRIAL_DESIGN: entry})
    first, second = study.ask(), study.ask()
    assert taken_by(first) is None and taken_by(second) == first.number


def test_every_searched_depth_is_answered_and_a_resume_enqueues_nothing(tmp_path):
    cfg = tiny_config(
        tmp_path, study={"n_trials": 3, "pruner": "median"}, search={"unfreeze_depth": [0, 1, 2], "epochs": [1, 1]}
    )
    study = study_mod.run_study(cfg)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["unfreeze_depth"] for t in complete) == [0, 1, 2]
    assert sorted(e["depth"] for e in _design(study.trials)) == [0, 1, 2]
    assert "step" in study.user_attrs[attrs.STUDY_PRUNING]
    effective = study.user_attrs[attrs.STUDY_EFFECTIVE_SETTINGS]["backbone_lr_mult"]
    assert effective == {"value": 1.0, "source": "default for a randomly initialised backbone"}
    assert all(t.user_attrs[attrs.TRIAL_EFFECTIVE_SETTINGS] == {"backbone_lr_mult": 1.0} for t in complete)

    resumed = study_mod.run_study(cfg.with_overrides(study={"n_trials": 4}))
    assert len(resumed.trials) == 4 and all(t.state == TrialState.COMPLETE for t in resumed.trials)
    assert len(_design(resumed.trials)) == 3  # the resumed run enqueued nothing


# --------------------------------------------------------------------------- backbone_lr_mult


def _optimizer_lrs(tmp_path, monkeypatch, **train) -> tuple[dict, dict]:
    """The optimizer's lr per group in a trial of the tiny study (no training), and the trial's attrs."""
    seen = {}

    def first_step_only(model, data, train_idx, val_idx, s, device, *args, **kwargs):
        seen.update({g["name"]: g["lr"] for g in build_optimizer(model, s, device).param_groups})
        raise InterruptedError("stop before training")

    monkeypatch.setattr(trial_mod, "fit", first_step_only)
    cfg = tiny_config(tmp_path, train=train)
    objective = study_mod.Objective(cfg, study_mod.decode_dataset(cfg, show_progress=False), torch.device("cpu"))
    trial = optuna.trial.FixedTrial({"unfreeze_depth": 1, "lr": 4e-3, "epochs": 1, "train_ratio": 0.7})
    with pytest.raises(InterruptedError):
        objective(trial)
    return seen, trial.user_attrs


def test_random_init_backbone_learns_at_the_head_lr_by_default(tmp_path, monkeypatch):
    lrs, user_attrs = _optimizer_lrs(tmp_path, monkeypatch)
    assert lrs["backbone"] == lrs["head"] == 4e-3
    assert user_attrs[attrs.TRIAL_EFFECTIVE_SETTINGS] == {"backbone_lr_mult": 1.0}


def test_an_explicit_backbone_lr_mult_is_honoured(tmp_path, monkeypatch):
    lrs, user_attrs = _optimizer_lrs(tmp_path, monkeypatch, backbone_lr_mult=0.25)
    assert lrs["head"] == 4e-3 and lrs["backbone"] == 4e-3 * 0.25
    assert user_attrs[attrs.TRIAL_EFFECTIVE_SETTINGS] == {"backbone_lr_mult": 0.25}


def test_backbone_lr_mult_default_follows_the_weights(tmp_path):
    assert TrainSection().for_backbone(pretrained=True).backbone_lr_mult == 0.1
    assert TrainSection().for_backbone(pretrained=False).backbone_lr_mult == 1.0
    assert TrainSection(backbone_lr_mult=0.5).for_backbone(pretrained=True).backbone_lr_mult == 0.5
    # Unset stays unset through the resolved study file; an integer in TOML is a float.
    cfg = from_dict({"train": {"epochs": 2}}, source="x.toml")
    saved = tmp_path / "config.toml"
    saved.write_text(cfg.to_toml())
    assert "backbone_lr_mult" not in saved.read_text() and load_config(saved).train.backbone_lr_mult is None
    saved.write_text("[train]\nbackbone_lr_mult = 1\n")
    assert load_config(saved).train.backbone_lr_mult == 1.0
