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
STUDY_REFIT = "refit"  # the refit model: source trial, settings, train samples, holdout scores, files
STUDY_FILES = "files"  # the study's files in the artifact store: name (best.pt, model/..., report.html) -> artifact id

# Trial user attrs.
TRIAL_HISTORY = "history"  # one dict per epoch (train.EpochRecord)
TRIAL_VAL_ACCURACY = "val_accuracy"
TRIAL_VAL_MACRO_F1 = "val_macro_f1"
TRIAL_BEST_EPOCH = "best_epoch"
TRIAL_TRAIN_SECONDS = "train_seconds"
TRIAL_IMAGES_PER_S = "images_per_s"
TRIAL_DEVICE = "device"
TRIAL_WORKER = "worker"  # {"host", "pid", "worker"}: the process that ran the trial (``workers.identity``)
TRIAL_WEIGHTS = "weights"
TRIAL_SPLIT_SIZES = "split_sizes"
TRIAL_CHECKPOINT = "checkpoint_artifact"  # artifact id (``study.artifacts``); removed when the trial leaves the top
TRIAL_FEATURE_CACHE = "feature_cache"
TRIAL_ERROR = "error"

# How the study's answers were reached: the pruning rule, the starting design, run-time defaults.
STUDY_PRUNING = "pruning"  # one line: how trials were compared and when they could be pruned
STUDY_EFFECTIVE_SETTINGS = "effective_settings"  # backbone-dependent [train] keys: key -> {value, source}
TRIAL_DESIGN = "design"  # {"depth", "round"} of a starting-design trial; absent on sampled trials
TRIAL_EFFECTIVE_SETTINGS = "effective_settings"  # backbone-dependent [train] keys as this trial trained

# The training regime (DESIGN decision 7; ``images.batches.Views.describe``): views, augmentation,
# crop ranges, the views' seed; a trial's also says where its frozen activations were (``cache``:
# gpu, host or none), set when it starts, so pruned and failed trials carry it too.
STUDY_REGIME = "regime"  # the study's regime: every trial trains on these views, cached or not
TRIAL_REGIME = "regime"  # this trial's regime plus ``cache``


def fmt_param(value) -> str:
    """A parameter value as people read it: 3 significant digits, small rates in e-notation."""
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.3g}"
    return "—" if value is None else str(value)


# Holdout images never scored because a pool image holds the same bytes (``DecodedData.holdout_rows``):
# keys of the dataset summary (STUDY_DATASET) and, the counts, of the best trial's holdout scores (STUDY_HOLDOUT).
HOLDOUT_SCORED = "holdout_scored"  # holdout images scored
HOLDOUT_COPIES = "holdout_copies"  # holdout images excluded as copies of training (pool) images
HOLDOUT_COPY_FILES = "holdout_copy_files"  # [holdout file, pool file it copies], the first few (study.dataset)

# Ranking on common ground and the confirmation stage (DESIGN decision 7; ``study.ranking``, ``study.confirm``).
STUDY_COMMON_SUBSET = "common_subset"  # {"train_ratio", "rows", "metric"}: the validation rows every trial is ranked on
STUDY_CONFIRM = "confirmation"  # the confirmation summary: per depth and per sweep ratio, n, mean and 95% interval
TRIAL_COMMON_VAL = "common_val"  # the objective's metric on the common validation subset (ranks the trials)
TRIAL_CONFIRM = "confirm"  # a confirmation run's plan entry: {"depth", "seed", "train_ratio", "source"}
TRIAL_SWEEP_VAL = "sweep_val"  # a confirmation run's metric on the learning-curve sweep's common subset
TRIAL_HOLDOUT_ACCURACY = "holdout_accuracy"  # a confirmation run's accuracy on the scored holdout rows
#: The confirmation runs are trials of a sibling study in the same storage: ``<study>-confirm``.
CONFIRM_SUFFIX = "-confirm"
