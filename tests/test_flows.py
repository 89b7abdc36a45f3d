"""Flows through a real Prefect API server: the study flow, caching, a killed worker, and
several workers sharing one PostgreSQL study."""

import os
import signal
import time
import tomllib
import uuid
from pathlib import Path

import optuna
import pytest
from helpers import flow_run_logs, tiny_config
from optuna.trial import TrialState

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api(prefect_server):
    """The session's Prefect server, for flows run in this process and in worker processes."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


def _task_states(flow_state) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def test_study_flow_leaves_study_report_and_caches_preparation(prefect_api, tmp_path, monkeypatch):
    from flows.study import study_flow

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, search={"epochs": [1, 1]}, confirm={"enabled": True, "seeds": 2})
    state = study_flow(study=cfg, return_state=True)
    report = Path(state.result())
    assert report.is_file() and report.name == "report.html"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 2
    assert _task_states(state)["decode-images"] == "Completed"
    assert _task_states(state)["confirm"] == "Completed"  # after the search: each depth's best setting, 2 seeds
    assert [g["metric"]["n"] for g in study.user_attrs["confirmation"]["depths"]] == [2, 2]
    assert 'data-figure="confirmation"' in report.read_text()

    # Resume: one more trial (the once-per-study work after it is what the first run showed).
    again = study_flow(study=cfg.with_overrides(study={"n_trials": 3}), report=False, return_state=True)
    assert _task_states(again)["decode-images"] == "Cached"  # unchanged dataset, not decoded twice
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 3

    images = next((tmp_path / "cache").glob("*/images.npy"))
    images.write_bytes(images.read_bytes()[:100])  # a disk that filled up
    healed = study_flow(study=cfg.with_overrides(study={"n_trials": 3}), report=False, return_state=True)
    assert healed.is_completed() and _task_states(healed)["decode-images"] == "Completed"  # rebuilt, not "Cached"


def _running_with_progress(storage: str, name: str):
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("history"):
            return t
    return None


def _several_worker_storage(tmp_path: Path) -> str:
    """PostgreSQL, the storage for several workers, where the test server is given (as
    ``.ci/services.sh`` gives it, and CI requires it); else the study's SQLite file, which
    several processes also share (the pool test's two workers run on one)."""
    url = os.environ.get("TRANSFERSTUDY_TEST_POSTGRES_URL")
    if not url and os.environ.get("TRANSFERSTUDY_REQUIRE_SERVICES"):
        pytest.fail("TRANSFERSTUDY_TEST_POSTGRES_URL is not set (.ci/services.sh starts PostgreSQL)")
    return url or f"sqlite:///{tmp_path}/optuna.db"


def test_prepare_flow_writes_manifest_and_problem_table(prefect_api, tmp_path, make_dataset):
    from flows.prepare import prepare_flow

    source = make_dataset("photos", num_classes=2, per_class=4, size=16)
    (source / "test" / "class_1" / "notes.txt").write_text("not an image")
    outcome = prepare_flow(str(source), str(tmp_path / "prepared"))
    assert Path(outcome["manifest"]).is_file() and outcome["images"] == 12
    assert [Path(f).name for f, _ in outcome["problems"]] == ["notes.txt"]
    again = prepare_flow(str(source), str(tmp_path / "prepared"))
    assert (again["hashed"], again["decoded"]) == (0, 0)


def _flow_run_of(api_url: str, study_name: str):
    """The transfer-study flow run whose study parameter has this name, and its task runs by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        studies = [(r, r.parameters.get("study")) for r in runs]  # the report flow's "study" is a name
        run = next(r for r, s in studies if isinstance(s, dict) and s["study"]["name"] == study_name)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    return run, {t.name: t for t in tasks}


@pytest.mark.postgres
def test_two_workers_share_the_study_survive_a_killed_one_and_report_once(prefect_api, tmp_path, monkeypatch):
    """``--workers 2 --device cpu`` on PostgreSQL: two worker processes, each with its own
    sampler seed, as child task runs of one flow run; one is killed mid-trial, its task starts
    it again, the killed trial's parameters run again, and the study ends with exactly n_trials;
    the holdout is scored and the report written once, and no library warning reaches the log."""
    import contextvars
    import threading

    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    from flows.study import plan, study_flow

    monkeypatch.chdir(tmp_path)
    name = f"fanout-{uuid.uuid4().hex[:8]}"  # a PostgreSQL database outlives the test
    cfg = tiny_config(
        tmp_path,
        study={"name": name, "n_trials": 3, "heartbeat_s": 2, "device": "cpu"},
        search={"unfreeze_depth": [5], "epochs": [2, 2]},  # whole-network epochs: a trial lasts seconds
    )
    storage = _several_worker_storage(tmp_path)
    cfg = cfg.with_overrides(study={"storage": storage})
    assert [s.device for s in plan(cfg, 2, None)] == ["cpu", "cpu"]
    outcome: dict = {}

    def parent() -> None:  # the flow run, in this process (its workers are processes of their own)
        try:
            outcome["report"] = study_flow(study=cfg, workers=2)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            outcome["error"] = exc

    thread = threading.Thread(target=contextvars.copy_context().run, args=(parent,), daemon=True)
    thread.start()
    deadline = time.time() + 240
    while (victim := _running_with_progress(storage, name)) is None:
        assert thread.is_alive(), outcome
        assert time.time() < deadline, "no trial got going in time"
        time.sleep(0.2)
    os.kill(victim.user_attrs["worker"]["pid"], signal.SIGKILL)
    thread.join(400)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert Path(outcome["report"]) == tmp_path / name / "report.html"

    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3  # exactly n_trials, though two processes ran them and one died
    assert next(t for t in trials if t.number == victim.number).state == TrialState.FAIL
    # Its parameters ran again: as the storage's retry of the stale trial (system attr failed_trial),
    # or, for a starting-design entry, as the entry's other copy (each worker enqueues missing ones).
    assert any(t.params == victim.params for t in complete)
    ran = {t.user_attrs["worker"]["worker"] for t in trials if "worker" in t.user_attrs}
    assert ran == {"0/2 cpu", "1/2 cpu"}  # both workers ran trials (the killed one, at least its last)

    seeds = {
        tomllib.loads(p.read_text())["study"]["sampler_seed"] for p in (tmp_path / name / "workers").glob("*.toml")
    }
    assert len(seeds) == 2  # each worker samples with a seed of its own

    run, tasks = _flow_run_of(prefect_api, name)
    workers = {task: t for task, t in tasks.items() if task.startswith("study-worker-")}
    assert sorted(workers) == ["study-worker-0 (cpu)", "study-worker-1 (cpu)"]
    assert all(t.state.is_completed() for t in workers.values()) and run.state.is_completed()
    assert sum(t.run_count for t in workers.values()) == 3  # one retry: the killed worker's
    assert [task.rsplit("-", 1)[0] for task in tasks].count("score-holdout") == 1  # the holdout, once
    assert [task.rsplit("-", 1)[0] for task in tasks].count("build-report") == 1  # one report
    header = (tmp_path / name / "report.html").read_text()
    assert "2 workers: 0/2 cpu (" in header and 'data-figure="timeline"' in header  # who ran what, and when

    APILogWorker.drain_all(timeout=5)  # this process's (the parent's) log lines, workers' included
    with get_client(sync_client=True) as client:
        logs = flow_run_logs(client, [run.id], "worker ", seconds=10)
    assert sum("trial(s) to run" in line for line in logs) >= 2  # both workers joined the study
    # No library warning (Python's, or Optuna's "[W ...]" lines): refused and stale trials are
    # said in the project's words.
    assert [line for line in logs if "Warning" in line or "[W " in line] == []
    optuna.delete_study(study_name=name, storage=storage)
