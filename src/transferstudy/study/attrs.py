"""The names of what a study stores, written and read through this module only.

Study user attrs (``STUDY_*``) and trial user attrs (``TRIAL_*``): the report is rebuilt from
the storage alone, so these names are the contract between the study and the report.
"""

from __future__ import annotations

from optuna.trial import TrialState

#: Trial states that count towards ``n_trials`` (failed trials are retried, so they don't).
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# Study user attrs.
STUDY_CONFIG = "config"  # the resolved study configuration (dict)
STUDY_DATASET = "dataset"  # classes, split sizes, holdout protocol, skipped files, cache location
STUDY_RUNS = "runs"  # one entry per run: started, device, argv
STUDY_COMMAND = "command"  # the command that reproduces the study
STUDY_WEIGHTS = "weights"  # what the backbone held: requested, used, warning
STUDY_HOLDOUT = "holdout"  # the best trial's detailed holdout scores
STUDY_HOLDOUT_TOP = "holdout_top"  # holdout summary per top trial number (str)

# Trial user attrs.
TRIAL_HISTORY = "history"  # one dict per epoch (train.EpochRecord)
TRIAL_VAL_ACCURACY = "val_accuracy"
TRIAL_VAL_MACRO_F1 = "val_macro_f1"
TRIAL_BEST_EPOCH = "best_epoch"
TRIAL_TRAIN_SECONDS = "train_seconds"
TRIAL_IMAGES_PER_S = "images_per_s"
TRIAL_DEVICE = "device"
TRIAL_WEIGHTS = "weights"
TRIAL_SPLIT_SIZES = "split_sizes"
TRIAL_CHECKPOINT = "checkpoint"  # path; the file is deleted when the trial leaves the top
TRIAL_FEATURE_CACHE = "feature_cache"
TRIAL_ERROR = "error"


def fmt_param(value) -> str:
    """A parameter value as people read it: 3 significant digits, small rates in e-notation."""
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.3g}"
    return "—" if value is None else str(value)
