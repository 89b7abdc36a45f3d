"""Long-running servers users rely on: a served, scheduled deployment on a real Prefect API
server, and optuna-dashboard reading our storage."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import tiny_config

from transferstudy import study as study_mod

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> bytes:
    # A private opener without proxies: urllib's global one keeps whatever proxy settings the
    # first download of the process saw (an offline test sets a dead one on purpose).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with opener.open(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_served_deployment_has_its_cron_schedule(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    served = None
    try:
        _wait_http(f"{api}/health", server, 180)
        served = subprocess.Popen(
            [sys.executable, "-m", "flows.study", "--serve", "--cron", "0 3 * * *", "--name", "nightly"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deployment = _wait_for_deployment(api, "nightly", served)
        crons = [s.schedule.cron for s in deployment.schedules]
        assert crons == ["0 3 * * *"]
        assert deployment.parameters["config"].endswith("demo.toml")
    finally:
        _stop(*(p for p in (served, server) if p is not None))


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


def test_dashboard_lists_the_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, study={"n_trials": 1}, search={"epochs": [1, 1]})
    study_mod.run_study(cfg)
    port = _free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), cfg.study.storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        body = _wait_http(f"http://127.0.0.1:{port}/api/studies", dashboard, 60)
        names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
        assert names == ["tiny"]
    finally:
        _stop(dashboard)
