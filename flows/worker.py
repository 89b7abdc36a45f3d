"""One study worker of a fan-out (``python -m flows.study --workers N``).

The parent flow's ``study-worker`` task starts this process with its device pinned through the
environment (``transferstudy.workers``) and relays its log lines to the task's logs. It runs
trials of the shared study until the study has ``n_trials`` finished trials; the parent does
the once-per-study work (holdout, confirmation, refit, report) after every worker has ended.

    python -m flows.worker --config studies/demo/workers/worker-0.toml
"""

import argparse

from flows.common import run_cli, setup_logging
from transferstudy.config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the worker's study file (written by the parent flow)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_config(args.config)
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, show_progress=False)  # the cache the parent decoded
    study_mod.run_study(cfg, dataset, save_config=False)
    return 0


if __name__ == "__main__":
    run_cli(main)
