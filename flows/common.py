"""What every flow CLI shares: logging set-up and one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from transferstudy.config import ConfigError
from transferstudy.datasets.base import DatasetError


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean "your input is wrong": shown as one line, exit status 2. (The weights'
    error is looked up when one is raised: importing its module imports torch, which a
    ``--help`` or a bad study file need not wait for.)"""
    from transferstudy.model import WeightsUnavailableError

    return (ConfigError, DatasetError, WeightsUnavailableError, FileNotFoundError, ValueError)


def setup_logging(verbose: bool = False) -> None:
    """Engine progress (epochs, trials, decoding) on the console and in the flow-run logs."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Importing Prefect already configured the root logger (level WARNING, its console
    # handler), which makes basicConfig a no-op: set our own level explicitly.
    logging.getLogger("transferstudy").setLevel(level)
    for noisy in ("httpx", "httpcore", "alembic", "aiosqlite", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def engine_logging() -> None:
    """Engine progress in the flow-run logs of every run, also one started from the Prefect UI
    (where ``setup_logging`` of a CLI never ran): the engine's logger passes INFO records to
    the Prefect handlers that ``PREFECT_LOGGING_EXTRA_LOGGERS`` attached to it."""
    engine = logging.getLogger("transferstudy")
    if engine.getEffectiveLevel() > logging.INFO:
        engine.setLevel(logging.INFO)


def artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) for a study name."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "study"


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI body; bad input ends in ``error: <one line>`` and exit status 2."""
    try:
        sys.exit(main() or 0)
    except Exception as exc:
        if not isinstance(exc, user_errors()) or "-v" in sys.argv or "--verbose" in sys.argv:
            raise  # the whole traceback, for a bug that looks like bad input
        message = " ".join(str(exc).split("\n")[0].split()) if not isinstance(exc, DatasetError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: completed trials are kept in the storage; run the same command to resume", file=sys.stderr)
        sys.exit(130)
