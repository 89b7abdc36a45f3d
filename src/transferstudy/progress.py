"""Progress bars for long work, with a plain-logging fallback where tqdm is not installed."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("transferstudy")


class _LogProgress:
    """Logs ``desc: n/total`` at most every few seconds; used when tqdm is missing or off."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float = 5.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.n == self.total:
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            log.info("%s: %d/%d %s (%.0f %s/s)", self.desc, self.n, self.total, self.unit, rate, self.unit)

    def close(self) -> None:
        pass


class _NoProgress(_LogProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A progress bar on an interactive terminal, periodic log lines otherwise."""
    if not enabled:
        return _NoProgress(total, desc, unit)
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        except ImportError:
            pass
    return _LogProgress(total, desc, unit)
