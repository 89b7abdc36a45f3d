"""One study worker: runs trials of a shared study until it has ``n_trials`` finished trials.

Two ways in, one body (``work``):

- ``python -m flows.worker --config FILE``: a worker process of a one-node fan-out
  (``python -m flows.study --workers N``). The parent's ``study-worker`` task starts it with
  its device pinned through the environment (``transferstudy.workers``) and relays its log lines.
- the ``study-worker`` flow: a worker on a Prefect work pool (``python -m flows.study --deploy
  --pool NAME`` registers it; ``python -m flows.study --pool NAME --workers N`` starts N runs of
  it, as children of the parent's flow run). Its device is the one its Prefect worker sees
  (start one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set).

Either way the parent does the once-per-study work (holdout, confirmation, refit, report) after
every worker has ended, reading the workers' checkpoints from the study's artifact store.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from prefect import flow

from flows.common import engine_logging, run_cli, setup_logging
from transferstudy.config import StudyConfig, load_config
from transferstudy.workers import WORKER_ENV

log = logging.getLogger("transferstudy.flows")


def work(cfg: StudyConfig) -> int:
    """Run trials of the study until it is full; returns its finished-trial count."""
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, show_progress=False)  # the decode cache of this machine
    return study_mod.count_finished(study_mod.run_study(cfg, dataset, save_config=False))


@flow(name="study-worker")
def worker_flow(study: StudyConfig, worker: str = "pool", workdir: str | None = None) -> int:
    """One worker of a study on a work pool: run its trials until the study has ``n_trials``
    finished trials; returns that count.

    Args:
        study: the study configuration (the parent's, with this worker's sampler seed).
        worker: the worker's name, stored with each trial it runs.
        workdir: the parent's working folder: relative paths of the study (storage, data, results)
            are read from there when this machine has it (the same machine, or a shared mount).
    """
    engine_logging()
    _send_engine_lines()
    if workdir and Path(workdir).is_dir():
        os.chdir(workdir)
    elif workdir:
        log.warning(
            "working folder %s is not on this machine; relative study paths are read from %s", workdir, os.getcwd()
        )
    os.environ[WORKER_ENV] = worker  # recorded with every trial of this run (``workers.identity``)
    return work(study)


def _send_engine_lines() -> None:
    """Engine lines to this flow run's logs. A Prefect worker starts the run in a process of its
    own whose Prefect logging was set up before ``flows`` could set PREFECT_LOGGING_EXTRA_LOGGERS,
    so the engine's logger lacks the handler that sends to the API; the process is this run's alone."""
    from prefect.logging.handlers import APILogHandler

    engine = logging.getLogger("transferstudy")
    if not any(isinstance(h, APILogHandler) for h in engine.handlers):
        engine.addHandler(APILogHandler())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the worker's study file (written by the parent flow)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    work(load_config(args.config))
    return 0


if __name__ == "__main__":
    run_cli(main)
