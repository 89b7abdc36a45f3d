"""Optuna studies on real SQLite storage: objective, resume, failures, checkpoints, holdout."""

import contextlib
import logging
import math
import os

import optuna
import pytest
import torch
from helpers import tiny_config
from optuna.trial import TrialState

from transferstudy import study as study_mod
from transferstudy import trial as trial_mod
from transferstudy.train import NonFiniteLossError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo digits are written under ./studies/data


def _states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_objective_runs_with_fixed_trial(tmp_path):
    cfg = tiny_config(tmp_path)
    prepared = study_mod.decode_dataset(cfg, show_progress=False)
    objective = study_mod.Objective(cfg, prepared, torch.device("cpu"))
    trial = optuna.trial.FixedTrial({"unfreeze_depth": 1, "lr": 3e-3, "epochs": 2, "train_ratio": 0.7})
    value = objective(trial)
    assert 0.0 <= value <= 1.0
    history = trial.user_attrs["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert trial.user_attrs["val_accuracy"] == value
    assert trial.user_attrs["split_sizes"]["val"] > 0 and trial.user_attrs["weights"] == "none"


def test_search_space_follows_study_file(tmp_path):
    cfg = tiny_config(tmp_path, search={"weight_decay": [1e-6, 1e-2], "optimizer": ["adamw", "sgd"]})
    params = study_mod.suggest(
        optuna.trial.FixedTrial(
            {"unfreeze_depth": 0, "lr": 1e-3, "epochs": 1, "train_ratio": 0.7, "weight_decay": 1e-3, "optimizer": "sgd"}
        ),
        cfg,
    )
    assert params.optimizer == "sgd" and params.weight_decay == 1e-3 and params.batch_size == 32


def test_resume_continues_to_n_trials_in_total(tmp_path):
    cfg = tiny_config(tmp_path, search={"epochs": [1, 1]})
    first = study_mod.run_study(cfg)
    assert _states(first).count(TrialState.COMPLETE) == 2
    resumed = study_mod.run_study(cfg.with_overrides(study={"n_trials": 4}))
    assert _states(resumed).count(TrialState.COMPLETE) == 4
    assert len(resumed.trials) == 4
    params = [t.params for t in resumed.trials]
    assert params[2:] != params[:2]  # the resumed run does not replay the first run's suggestions
    again = study_mod.run_study(cfg.with_overrides(study={"n_trials": 4}))  # nothing left to do
    assert len(again.trials) == 4
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert again.user_attrs["config"]["study"]["n_trials"] == 4


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() below stands in for a worker
def test_run_started_right_after_a_kill_still_reaches_n_trials(tmp_path):
    # A worker killed during the last trial leaves it RUNNING with a fresh heartbeat. A run
    # started at once must wait for that trial to go stale, not stop one trial short as "full".
    cfg = tiny_config(tmp_path, study={"heartbeat_s": 1}, search={"epochs": [1, 1]})
    study_mod.run_study(cfg.with_overrides(study={"n_trials": 1}))
    storage = study_mod.create_storage(cfg.study.storage, heartbeat_s=1)
    study = optuna.load_study(study_name=cfg.study.name, storage=storage)
    dead = study.ask()
    study_id = storage.get_study_id_from_name(cfg.study.name)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, dead.number))

    resumed = study_mod.run_study(cfg)
    states = {t.number: t.state for t in resumed.trials}
    assert states[dead.number] == TrialState.FAIL
    assert list(states.values()).count(TrialState.COMPLETE) == 2
    assert not any("surplus" in str(t.user_attrs.get("error", "")) for t in resumed.trials)


def test_failed_trial_is_recorded_and_study_goes_on(tmp_path, monkeypatch):
    real_fit = trial_mod.fit
    calls = {"n": 0}

    def flaky_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise NonFiniteLossError("training loss became nan (try a lower learning rate)")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(trial_mod, "fit", flaky_fit)
    with _records("optuna") as optuna_said, _records("transferstudy") as we_said:
        study = study_mod.run_study(tiny_config(tmp_path, search={"epochs": [1, 1]}))
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "NonFiniteLossError" in failed[0].user_attrs["error"]
    assert _states(study).count(TrialState.COMPLETE) == 2
    # Said once, in the project's words: the progress line (a warning), not Optuna's warning and traceback.
    said = [r for r in we_said if "failed: NonFiniteLossError: training loss became nan" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]
    assert not [r for r in optuna_said if " failed " in r.getMessage()]

    def broken_fit(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(trial_mod, "fit", broken_fit)  # an error no trial should have: Optuna's warning stays
    with _records("optuna") as optuna_said, pytest.raises(RuntimeError, match="a bug"):
        study_mod.run_study(tiny_config(tmp_path, study={"name": "broken"}))
    assert any(r.getMessage().startswith("Trial 0 failed with parameters") for r in optuna_said)


@contextlib.contextmanager
def _records(name: str):
    """The records that ``name`` and its children log at their level (INFO for the engine's
    loggers, whose level is not set here) while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(level or logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the other worker's trial is made with ask/tell
def test_holdout_scores_and_checkpoint_policy(tmp_path):
    """Checkpoints live in the artifact store. A worker removes only its own that leave the top,
    never another worker's; the holdout scoring (the parent's, once per study) reads them
    whoever wrote them, keeps the best trial's only and stores it as best.pt."""
    cfg = tiny_config(tmp_path, study={"n_trials": 4, "report_top_k": 2}, search={"epochs": [1, 1]})
    foreign = _trial_of_another_worker(study_mod.open_study(cfg), tmp_path)  # last in any ranking
    study = study_mod.run_study(cfg)  # three trials of its own
    store = tmp_path / "tiny" / "artifacts"  # the default artifact store

    def stored(trial):
        return (store / str(trial.user_attrs.get("checkpoint_artifact"))).is_file()

    top = study_mod.top_trials(study, 2)
    assert stored(study.trials[foreign]) and foreign not in {t.number for t in top}  # left to its worker
    own = [t for t in study.trials if t.number != foreign]
    assert len(own) == 3 and {t.number for t in own if stored(t)} <= {t.number for t in top}

    prepared = study_mod.decode_dataset(cfg, show_progress=False)
    detail = study_mod.score_holdout(study, cfg, prepared)
    best = top[0]  # ranked on the common validation subset
    assert detail["trial"] == best.number
    assert len(detail["confusion"]) == 10 and 0.0 <= detail["accuracy"] <= 1.0
    assert set(study.user_attrs["holdout_top"]) == {str(t.number) for t in top}
    assert [t.number for t in study.trials if stored(t)] == [best.number]  # the foreign one too: the parent's job
    best_pt = tmp_path / "tiny" / "best.pt"  # the best trial's checkpoint artifact, not a second copy of it
    assert os.path.samefile(store / study.user_attrs["files"]["best.pt"], best_pt)
    assert study.user_attrs["files"]["best.pt"] == best.user_attrs["checkpoint_artifact"]
    assert math.isfinite(study.user_attrs["holdout_top"][str(best.number)]["macro_f1"])


def test_a_results_file_and_its_artifact_are_one_file_and_a_new_version_leaves_the_old_intact(tmp_path):
    """With a folder store a results file is its artifact (a hard link); writing a new version
    replaces the file, so the stored old version stays as it was until it is removed."""
    from transferstudy.study import artifacts

    cfg = tiny_config(tmp_path)
    study, store = study_mod.open_study(cfg), artifacts.open_store(cfg)
    page = tmp_path / "tiny" / "report.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("first")
    first = artifacts.put_study_file(study, store, page)
    assert os.path.samefile(page, store._base_path / first)
    with open(store._base_path / first) as old:  # a reader of the old version (the dashboard, say)
        tmp = page.with_name("report.html.tmp")  # how the report is written: aside, then renamed
        tmp.write_text("second")
        tmp.replace(page)
        assert old.read() == "first"
    second = artifacts.put_study_file(study, store, page)
    assert not (store._base_path / first).exists() and (store._base_path / second).read_text() == "second"
    assert study.user_attrs["files"] == {"report.html": second}
    copy = artifacts.fetch(store, second, tmp_path / "elsewhere" / "report.html")
    assert os.path.samefile(copy, page)
    with pytest.raises(FileNotFoundError, match=f"artifact {first} is not in the artifact store"):
        artifacts.fetch(store, first, tmp_path / "gone.html")


def _trial_of_another_worker(study, tmp_path) -> int:
    """A complete trial another process ran, with a checkpoint in the store, ranked below any other."""
    from transferstudy.study import artifacts

    trial = study.ask()
    dummy = tmp_path / "elsewhere.pt"
    dummy.write_bytes(b"a checkpoint written on another machine")
    (tmp_path / "tiny" / "artifacts").mkdir(parents=True)
    store = optuna.artifacts.FileSystemArtifactStore(tmp_path / "tiny" / "artifacts")
    trial.set_user_attr("checkpoint_artifact", artifacts.put_trial_file(trial, store, dummy))
    trial.set_user_attr("worker", {"host": "elsewhere", "pid": 1, "worker": "1/2 cuda:1"})
    trial.set_user_attr("common_val", -1.0)
    study.tell(trial, -1.0)
    return trial.number


def test_unreachable_storage_names_the_url(tmp_path):
    cfg = tiny_config(tmp_path, study={"storage": "postgresql://nobody:pw@127.0.0.1:9/none"})
    with pytest.raises(ValueError, match="127.0.0.1:9"):
        study_mod.open_study(cfg)


def test_broken_storage_file_names_the_file(tmp_path):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    cfg = tiny_config(tmp_path, study={"storage": f"sqlite:///{broken}"})
    with pytest.raises(ValueError, match="broken.db"):
        study_mod.open_study(cfg)


def test_problems_found_at_preparation_reach_the_study(tmp_path, make_dataset):
    from transferstudy.datasets.prepare import prepare

    source = make_dataset("photos", num_classes=3, per_class=6, size=16)
    (source / "train" / "class_0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = prepare(source, tmp_path / "prepared")
    cfg = tiny_config(
        tmp_path,
        study={"n_trials": 1},
        data={"path": str(result.manifest_path)},
        search={"unfreeze_depth": [0], "epochs": [1, 1]},
    )
    study = study_mod.run_study(cfg)
    problems = study.user_attrs["dataset"]["problems"]
    assert any(path.endswith("broken.jpg") for path, _ in problems)
    assert study.user_attrs["dataset"]["source"] == "manifest"


def test_unobtainable_weights_end_the_run_before_any_trial(tmp_path, monkeypatch):
    from transferstudy.model import WeightsUnavailableError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # every download refused at once
    cfg = tiny_config(tmp_path, train={"weights": "imagenet"})
    with pytest.raises(WeightsUnavailableError, match='"none"'):
        study_mod.run_study(cfg)
    assert optuna.load_study(study_name="tiny", storage=cfg.study.storage).trials == []


def test_a_streak_of_failed_trials_is_an_error(tmp_path, monkeypatch):
    def diverging_fit(*args, **kwargs):
        raise NonFiniteLossError("training loss became nan (try a lower learning rate)")

    monkeypatch.setattr(trial_mod, "fit", diverging_fit)
    with pytest.raises(RuntimeError, match="5 trials failed in a row"):
        study_mod.run_study(tiny_config(tmp_path))
