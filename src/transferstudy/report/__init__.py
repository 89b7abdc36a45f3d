"""The study report: one self-contained HTML page rebuilt from the Optuna storage alone.

The page answers "what should I unfreeze, for how long, at what rate, on how much data": a
header (dataset, weights, device, time, data problems, the command that reproduces the
study), findings computed from the trials, the best trials, the best trial on the holdout
(confusion matrix, confused pairs, per-class scores), learning curves, the effect of each
searched dimension, Optuna's own plots and misclassified holdout images.

Modules: ``load`` (the storage, read once), ``findings`` (sentences; no plotly), ``figures``
(plotly), ``html`` (formatting and tables), ``sections`` and ``page`` (the page; CSS, JS and
the Jinja2 template in ``assets/``). Everything comes from what the study stores (its names
are in ``study.attrs``); the only file read besides the storage is the optional decode cache,
for thumbnails. plotly.js is included once, inline, so the page opens offline from
``file://`` and can be mailed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .load import StudyData, default_path, load_data, open_study
from .page import render

__all__ = ["StudyData", "build_report", "default_path", "load_data", "open_study", "render"]

log = logging.getLogger(__name__)


def build_report(
    storage_url: str, study_name: str, out: str | Path | None = None, rebuild_command: str | None = None
) -> Path:
    """Write the study's self-contained HTML report and return its path.

    Args:
        storage_url: any Optuna storage URL, e.g. ``sqlite:///studies/optuna.db``.
        study_name: the Optuna study name.
        out: where to write; default ``<output_dir>/<name>/report.html`` from the stored config.
        rebuild_command: the command that rebuilds this report, shown in its header.
    """
    data = load_data(open_study(storage_url, study_name))
    page = render(data, rebuild_command)
    path = Path(out) if out else default_path(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)  # replaced, never rewritten: the stored artifact may share the file (study.artifacts)
    log.info("report of study %r written to %s (%.1f MB)", study_name, path, len(page.encode()) / 1e6)
    return path
