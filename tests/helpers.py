"""Shared builders for study tests: tiny study configs on the embedded digits."""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from transferstudy.config import StudyConfig, from_dict

TINY = {
    "study": {"name": "tiny", "n_trials": 2, "pruner": "none", "heartbeat_s": 2, "report_top_k": 2},
    "data": {"path": "demo", "image_size": 16, "demo_per_class": 12},
    "train": {"weights": "none", "batch_size": 32},
    "search": {"unfreeze_depth": [0, 1], "lr": [1e-3, 1e-2], "epochs": [1, 2], "train_ratio": [0.6, 0.8]},
    "refit": {"enabled": False},  # tests/test_refit.py turns it on
    "confirm": {"enabled": False},  # tests/test_confirm.py and the study-flow test turn it on
}


def tiny_raw(root: Path, **sections) -> dict:
    """A tiny study (16 px digits, 12 per class) whose files all live under ``root``."""
    raw = copy.deepcopy(TINY)
    raw["study"].update(storage=f"sqlite:///{root}/optuna.db", output_dir=str(root))
    raw["data"]["cache_dir"] = str(root / "cache")
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def tiny_config(root: Path, **sections) -> StudyConfig:
    return from_dict(tiny_raw(root, **sections), source=str(root / "tiny.toml"))


def write_toml(path: Path, raw: dict) -> Path:
    """Write a study dict as TOML (the subset study files use)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for table, values in raw.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(main, argv: list[str]) -> tuple[int, str, str]:
    """Run a flow CLI's ``main`` in this process as ``python -m`` would (``flows.common.run_cli``:
    one-line errors, exit status): (exit status, stdout, stderr). Cheaper than a subprocess,
    which pays the torch/Prefect imports again."""
    import contextlib
    import io
    import sys

    from flows.common import run_cli as run

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["python", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(lambda: main(argv))
    except SystemExit as done:
        return int(done.code or 0), out.getvalue(), err.getvalue()
    finally:
        sys.argv = saved
    raise AssertionError("run_cli always exits")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, seconds: float) -> bytes:
    """The body of ``url`` once it answers; fails if ``proc`` (the server, when it is ours) exits first."""
    # A private opener without proxies: urllib's global one keeps whatever proxy settings the
    # first download of the process saw (an offline test sets a dead one on purpose).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc is None or proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with opener.open(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def flow_run_logs(client, run_ids: list, first: str, seconds: float) -> list[str]:
    """Every log message of these flow runs on the server (all pages), read again until one starts
    with ``first`` or ``seconds`` have passed: a run's last lines reach the server in its log
    handler's next batch, which can come after the run has ended."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.time() + seconds
    flow_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(run_ids)))
    while True:
        logs = []
        while page := client.read_logs(log_filter=flow_filter, limit=200, offset=len(logs)):
            logs += page
        messages = [entry.message for entry in logs]
        if any(m.startswith(first) for m in messages) or time.time() > deadline:
            return messages
        time.sleep(1)


def shared_root(tmp_path_factory, name: str) -> Path:
    """A folder every test process of this session shares (under ``pytest -n N``, the parent of
    the processes' own base folders): a study built there once serves them all."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@contextlib.contextmanager
def built_once(root: Path):
    """Build what goes in ``root`` in one process at a time; the DONE file says it is there."""
    from filelock import FileLock

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        yield (root / "DONE").is_file()
        (root / "DONE").write_text("ok")
