"""One study worker: runs trials of a shared study until it has ``n_trials`` finished trials.

Two ways in, one body (``work``):

- ``python -m flows.worker --config FILE``: a worker process of a one-node fan-out
  (``python -m flows.study --workers N``). The parent's ``study-worker`` task starts it with
  its device pinned through the environment (``transferstudy.workers``) and relays its log lines.
- the ``study-worker`` flow (``flows.study.worker_flow``): a worker on a Prefect work pool
  (``python -m flows.study --deploy --pool NAME`` registers it; ``python -m flows.study --pool
  NAME --workers N`` starts N runs of it, as children of the parent's flow run). Its device is
  the one its Prefect worker sees (start one worker per GPU with ``CUDA_VISIBLE_DEVICES`` set).

This module does not import Prefect: a fan-out's worker processes do not need it.

Either way the parent does the once-per-study work (holdout, confirmation, refit, report) after
every worker has ended, reading the workers' checkpoints from the study's artifact store.
"""

from __future__ import annotations

import argparse
import logging

from flows.common import run_cli, setup_logging
from transferstudy.config import StudyConfig, load_config

log = logging.getLogger("transferstudy.flows")


def work(cfg: StudyConfig) -> int:
    """Run trials of the study until it is full; returns its finished-trial count."""
    from transferstudy.datasets.open import open_study_dataset

    # The dataset first: a machine without it fails in seconds, before the training engine loads.
    index = open_study_dataset(cfg.data.path, cfg.data.format, cfg.data.demo_per_class)
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)  # the decode cache of this machine
    return study_mod.count_finished(study_mod.run_study(cfg, dataset, save_config=False))


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
