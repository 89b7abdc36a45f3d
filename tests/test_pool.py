"""Many machines through Prefect: a real ``prefect server``, a real process work pool and two real
``prefect worker start`` processes on loopback run a study's trials; the parent flow run waits
for its worker runs, does the once-per-study work once, and fails clearly when a worker run fails."""

import os
import subprocess
import sys
import uuid

import optuna
import pytest
from helpers import flow_run_logs, run_cli, stop, tiny_raw, write_toml
from optuna.trial import TrialState

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pool(prefect_server, tmp_path_factory):
    """A process work pool with the study-worker deployment (``--deploy --pool``) and two Prefect
    workers serving it, one run at a time each (``--limit 1``, as on one GPU each)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.study import main

    name = f"pool-{uuid.uuid4().hex[:6]}"
    home = tmp_path_factory.mktemp("pool")
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        code, out, err = run_cli(main, ["--deploy", "--pool", name])
        assert code == 0, err
        assert f"deployment 'study-worker/{name}'" in out and f"prefect worker start --pool {name} --limit 1" in out
        from flows import PREFECT_ENV

        env = {
            # As a user's shell starts them: without the settings importing ``flows`` set here
            # (the deployment hands them to each run, so the engine's lines reach its logs).
            **{k: v for k, v in os.environ.items() if k not in PREFECT_ENV},
            "PREFECT_API_URL": prefect_server,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick a run up within a second, not ten
            "OMP_NUM_THREADS": "1",
        }
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", name, "--limit", "1", "--name", f"w{i}"],
                cwd=home,
                env=env,
                stdout=open(home / f"worker-{i}.log", "w"),
                stderr=subprocess.STDOUT,
            )
            for i in range(2)
        ]
        try:
            yield name
        finally:
            stop(*workers)


def test_pool_workers_run_the_study_and_the_parent_reports_once(prefect_server, pool, tmp_path, monkeypatch):
    """``--pool NAME --workers 2``: two study-worker runs on the pool, children of the parent's
    run; exactly n_trials finished trials, every one run by them; the holdout scored and the
    report written once, by the parent, from checkpoints the workers stored."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.study import main

    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(
        tmp_path,
        study={"name": "pooled", "n_trials": 2},
        search={"unfreeze_depth": [5], "epochs": [1, 1]},
    )
    toml = write_toml(tmp_path / "pooled.toml", raw)
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        code, out, err = run_cli(main, ["--config", str(toml), "--pool", pool, "--workers", "2"])
        assert code == 0, err
        with get_client(sync_client=True) as client:
            parent = next(
                r
                for r in client.read_flow_runs()
                if "pool" in r.parameters and r.parameters["study"]["study"]["name"] == "pooled"  # the parent's
            )
            own = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent.id])))
            tasks = [t.name.rsplit("-", 1)[0] for t in own]
            children = client.read_flow_runs(  # run_deployment links each run to a task run of the parent
                flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in own]))
            )
    assert parent.state.is_completed()
    assert sorted(r.name for r in children) == ["study-worker-0 (pooled)", "study-worker-1 (pooled)"]
    assert all(r.state.is_completed() and r.work_pool_name == pool for r in children)
    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        logs = flow_run_logs(client, [r.id for r in children], "trial ", seconds=30)
    assert any(line.startswith("trial ") for line in logs), "the workers' engine lines are in their flow-run logs"

    study = optuna.load_study(study_name="pooled", storage=raw["study"]["storage"])
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2  # exact, though two workers ran them
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ran = {t.user_attrs["worker"]["worker"] for t in complete}
    assert ran and ran <= {f"0/2 pool {pool}", f"1/2 pool {pool}"}  # trials ran in the pool's runs only
    assert os.getpid() not in {t.user_attrs["worker"]["pid"] for t in complete}
    # The parent read every top trial's checkpoint, written by the workers, from the artifact store.
    assert set(study.user_attrs["holdout_top"]) == {str(t.number) for t in complete}
    assert tasks.count("score-holdout") == 1 and tasks.count("build-report") == 1
    assert (tmp_path / "pooled" / "report.html").is_file() and (tmp_path / "pooled" / "best.pt").is_file()


def test_parent_fails_clearly_when_a_worker_run_fails(prefect_server, pool, tmp_path):
    """A worker run that fails (here: its study names a dataset that machine does not have) makes
    the parent's wait raise, naming the run and its state."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.study import await_runs
    from transferstudy.config import from_dict

    cfg = from_dict(tiny_raw(tmp_path, data={"path": str(tmp_path / "not-on-this-machine")}), source="broken.toml")
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        run = run_deployment(f"study-worker/{pool}", parameters={"study": cfg.model_dump(mode="json")}, timeout=0)
        with pytest.raises(
            RuntimeError, match=r"1 of 1 study-worker runs on work pool .* did not complete: lost \(Failed"
        ):
            await_runs([("lost", run.id)], pool, poll_s=0.5)


def test_deploy_and_pool_need_a_prefect_server(tmp_path):
    """Without PREFECT_API_URL a run would get a temporary server no pool worker sees: one line."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.study import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        for argv in (["--deploy", "--pool", "gpus"], ["--pool", "gpus", "--workers", "2"]):
            code, _, err = run_cli(main, argv)
            assert code == 2 and "PREFECT_API_URL" in err, err
