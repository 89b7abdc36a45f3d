"""Optuna studies: search space, objective, storage, sampler, pruner, resume, holdout scoring.

A study searches unfreeze depth, learning rate, epochs and train/validation split ratio (plus
any optional dimensions of the study file). Optuna optimises the validation metric; the fixed
holdout is scored only for the best trials, after the search (README, "Design decisions" 2).

Modules: ``dataset`` (open and decode once), ``space`` (search space), ``objective`` (one
trial), ``runner`` (storage, sampler, pruner, resume), ``holdout`` (scoring the best trials),
``confirm`` (the best setting of each depth retrained with several seeds: the answer with n and
an interval), ``ranking`` (the best trials, on the common validation subset),
``refit`` (the chosen configuration trained on the whole pool, scored and exported),
``artifacts`` (checkpoints, ``best.pt``, the model and the report in Optuna's artifact store,
readable by whichever machine runs the once-per-study work), ``attrs`` (the names of
everything the study stores; the report reads them back from there).

Studies resume: running the same study again continues up to ``n_trials`` finished trials in
total. Trials of a killed worker stop sending heartbeats; the next run marks them failed and
re-runs their parameters (a run started within the grace period, ``2 x heartbeat_s``, waits
it out when those trials are all that make the study look full).
"""

import importlib

#: Public names and the module that defines each; imported on first use (PEP 562), so that
#: ``study.attrs`` stays light for readers such as the report.
_EXPORTS = {
    "FINISHED": "attrs",
    "DecodedData": "dataset",
    "decode_dataset": "dataset",
    "open_index": "dataset",
    "results_table": "holdout",
    "score_holdout": "holdout",
    "top_trials": "holdout",
    "confirm_study": "confirm",
    "Objective": "objective",
    "SurplusTrial": "objective",
    "count_finished": "runner",
    "create_storage": "runner",
    "open_study": "runner",
    "preflight": "runner",
    "refit_best": "refit",
    "run_study": "runner",
    "start_study": "runner",
    "suggest": "space",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
