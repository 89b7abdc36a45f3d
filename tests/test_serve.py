"""Long-running servers users rely on: a served, scheduled deployment on a real Prefect API
server, and optuna-dashboard reading our storage."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import flow_run_logs, free_port, stop, tiny_config, tiny_raw, wait_http, write_toml

from transferstudy import study as study_mod

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_served_deployment_carries_the_study_and_logs_the_engine(prefect_server, tmp_path):
    """A served deployment: its schedule, the whole study configuration as its parameter (a
    form in the UI; no study file needed where it runs), and a run started from the server
    (a UI Quick run) whose flow-run logs hold the engine's progress lines."""
    api = prefect_server
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # pick the run up within a second, not ten
    }
    toml = write_toml(tmp_path / "tiny.toml", tiny_raw(tmp_path, study={"n_trials": 1}, search={"epochs": [1, 1]}))
    served = None
    try:
        served = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.study",
                "--config",
                str(toml),
                "--serve",
                "--cron",
                "0 3 * * *",
                "--name",
                "nightly",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deployment = _wait_for_deployment(api, "nightly", served)
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        study = deployment.parameters["study"]
        assert study["study"]["name"] == "tiny" and study["search"]["space"]["epochs"] == [1, 1]
        schema = json.dumps(deployment.parameter_openapi_schema)
        assert '"n_trials"' in schema and '"minimum": 1' in schema and '"unfreeze_depth"' in schema  # a validated form
        toml.unlink()  # the run below needs no study file
        logs = _quick_run_logs(api, deployment.id, served, "report of study 'tiny' written to")
        assert any(line.startswith("trial 0 [") for line in logs), logs
        assert any(line.startswith("report of study 'tiny' written to") for line in logs), logs
    finally:
        if served is not None:
            stop(served)


def _quick_run_logs(api: str, deployment_id, proc: subprocess.Popen, last_line: str, seconds: float = 300) -> list[str]:
    """Start a run of the deployment through the server (what the UI's Quick run does), wait
    for it to finish, and return its flow-run log messages from the server's logs API once the
    one starting with ``last_line`` has arrived (or the time is up)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.time() + seconds
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment_id)
        while not (state := client.read_flow_run(run.id).state).is_final():
            assert proc.poll() is None, "the serve process exited"
            assert time.time() < deadline, f"the run did not finish within {seconds} s ({state.name})"
            time.sleep(1)
        assert state.is_completed(), state
        return flow_run_logs(client, [run.id], last_line, max(0.0, deadline - time.time()))


def _wait_for_deployment(api: str, name: str, proc: subprocess.Popen, seconds: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.time() + seconds
    with temporary_settings({PREFECT_API_URL: api}):
        while time.time() < deadline:
            assert proc.poll() is None, "the serve process exited"
            with get_client(sync_client=True) as client:
                found = [d for d in client.read_deployments() if d.name == name]
            if found:
                return found[0]
            time.sleep(1)
    raise AssertionError(f"deployment {name!r} was not registered within {seconds} s")


def test_dashboard_lists_the_study_and_shows_a_trials_checkpoint(tmp_path, monkeypatch):
    """optuna-dashboard on our storage, with --artifact-dir at the study's artifact store: the
    study is listed, and its trial's checkpoint is an artifact the dashboard serves."""
    from transferstudy.study import artifacts

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, study={"n_trials": 1}, search={"epochs": [1, 1]})
    study_mod.run_study(cfg)
    store = artifacts.store_location(cfg)
    port = free_port()
    dashboard = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optuna-dashboard"),
            cfg.study.storage,
            "--artifact-dir",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        summaries = json.loads(wait_http(f"{base}/api/studies", dashboard, 60))["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["tiny"]
        study_id = summaries[0]["study_id"]
        trial = json.loads(wait_http(f"{base}/api/studies/{study_id}", dashboard, 10))["trials"][0]
        [meta] = trial["artifacts"]
        assert meta["filename"] == "trial_0000.pt"
        body = wait_http(f"{base}/artifacts/{study_id}/{trial['trial_id']}/{meta['artifact_id']}", dashboard, 10)
        assert body == (Path(store) / meta["artifact_id"]).read_bytes()
    finally:
        stop(dashboard)
