"""Reading a study for the report: everything comes from the Optuna storage (``study.attrs`` names it)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..config import StudySection
from ..study import attrs as stored
from ..study import ranking

# Heartbeats, stale-trial retries, multivariate TPE and the importance plot are Optuna features
# marked experimental; they are used knowingly, so their notices are not the user's business.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

#: Best trials shown when the stored config has no ``report_top_k``.
DEFAULT_TOP_K = StudySection.model_fields["report_top_k"].default


@dataclass
class StudyData:
    """What the report needs from one study, read once from the storage."""

    study: optuna.Study
    config: dict
    dataset: dict
    attrs: dict
    trials: list[FrozenTrial]
    top: list[FrozenTrial] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.study.study_name

    def of_state(self, *states: TrialState) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state in states]

    @property
    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.of_state(TrialState.COMPLETE) if t.value is not None and math.isfinite(t.value)]

    @property
    def objective(self) -> str:
        return self.config.get("study", {}).get("objective", "val_accuracy")

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.get("class_names") or [])

    @property
    def on_common_subset(self) -> bool:
        """Whether the trials are ranked on the common validation subset (else on their own values)."""
        return bool(self.complete) and ranking.on_common_subset(self.complete)

    def rank_value(self, trial: FrozenTrial) -> float:
        """What ``trial`` is ranked by (``study.ranking``)."""
        return ranking.ranking_value(trial.value, trial.user_attrs, self.on_common_subset)

    def param(self, trial: FrozenTrial, key: str):
        """A trial's value of ``key``: searched, else the study's fixed ``[train]`` setting."""
        return trial.params.get(key, self.config.get("train", {}).get(key))

    def searched(self) -> list[str]:
        """Searched dimensions in study-file order (then any others the trials show)."""
        keys = list(self.config.get("search", {}))
        for t in self.trials:
            keys += [k for k in t.params if k not in keys]
        return keys


def open_study(storage_url: str, study_name: str) -> optuna.Study:
    """Load a study for reading.

    Raises:
        FileNotFoundError: a SQLite storage file does not exist (it would be created empty).
        ValueError: the storage has no study of that name (the message lists the ones it has).
    """
    if storage_url.startswith("sqlite:///") and storage_url != "sqlite:///:memory:":
        path = Path(storage_url.removeprefix("sqlite:///")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no Optuna storage at {path} (from {storage_url})")
    try:
        return optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        names = optuna.study.get_all_study_names(storage=storage_url)
        raise ValueError(
            f"no study {study_name!r} in {storage_url}; it has: {', '.join(names) or 'no studies'}"
        ) from None


def load_data(study: optuna.Study) -> StudyData:
    attrs = dict(study.user_attrs)
    data = StudyData(
        study=study,
        config=attrs.get(stored.STUDY_CONFIG) or {},
        dataset=attrs.get(stored.STUDY_DATASET) or {},
        attrs=attrs,
        trials=study.get_trials(deepcopy=False),
    )
    k = int(data.config.get("study", {}).get("report_top_k") or DEFAULT_TOP_K)
    data.top = ranking.rank(data.complete, k)  # on the common validation subset, as the study ranks
    return data


def default_path(data: StudyData) -> Path:
    """``<config.study.output_dir>/<name>/report.html`` (``studies/`` when the config is missing)."""
    return Path(data.config.get("study", {}).get("output_dir") or "studies") / data.name / "report.html"
