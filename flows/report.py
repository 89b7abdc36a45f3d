"""Rebuild a study's HTML report from its Optuna storage alone (no study file, no dataset).

    python -m flows.report --study demo                                   # -> studies/demo/report.html
    python -m flows.report --study cars --storage postgresql://user:pw@host/optuna --out cars.html

Prints the path of the report. The decode cache is read only for misclassified thumbnails;
the page notes when it is gone.
"""

from __future__ import annotations

import argparse
import logging
import shlex

from prefect import flow

from flows.common import engine_logging, run_cli, setup_logging
from transferstudy.config import StudySection

log = logging.getLogger("transferstudy.flows")

#: The storage every study file uses unless it names another.
DEFAULT_STORAGE = StudySection().storage


def rebuild_command(study: str, storage: str) -> str:
    """The command that rebuilds a study's report (shown in the report's header)."""
    return f"python -m flows.report --study {shlex.quote(study)} --storage {shlex.quote(storage)}"


@flow(name="study-report")
def report_flow(study: str, storage: str = DEFAULT_STORAGE, out: str | None = None) -> str:
    """Write the self-contained HTML report of one study; returns its path."""
    from transferstudy.report import build_report

    engine_logging()
    return str(build_report(storage, study, out, rebuild_command=rebuild_command(study, storage)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.report", description="Rebuild a study's HTML report from its Optuna storage."
    )
    p.add_argument("--study", required=True, help="Optuna study name")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL (default: %(default)s)")
    p.add_argument("--out", help="report path (default: <output_dir>/<study>/report.html from the stored config)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    # Check the study exists before Prefect starts, so a typo is one line, not a failed flow run.
    from transferstudy.report import open_study

    open_study(args.storage, args.study)
    print(report_flow(study=args.study, storage=args.storage, out=args.out))
    return 0


if __name__ == "__main__":
    run_cli(main)
