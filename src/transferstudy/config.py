"""Typed, validated study configuration, loaded from ``studies/*.toml``.

A study file has four tables; every key is optional and documented below where it is
defined (units, range, default). Unknown keys and out-of-range values are rejected with a
one-line error that names the file and the key, e.g.::

    studies/demo.toml: [search] lr: expected [low, high] with 0 < low <= high, got [0.1, 0.001]

The resolved configuration (defaults filled in, overrides applied) is saved with the study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where committed study definitions live; ``python -m flows.study`` defaults to demo.toml.
STUDIES_DIR = Path("studies")
DEFAULT_CONFIG = STUDIES_DIR / "demo.toml"


#: Named weights (anything else is the path of a local ResNet-50 state_dict) and devices.
WEIGHT_CHOICES = ("imagenet", "none", "auto")
DEVICE_CHOICES = ("auto", "cpu", "cuda")  # or cuda:N


class ConfigError(ValueError):
    """A study file is unusable; str() is one line naming the file and the key."""


def _spec(default, doc: str, *, choices=None, lo=None, hi=None, lo_open=False):
    return field(default=default, metadata={"doc": doc, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True)
class StudySection:
    """``[study]``: what to optimise, for how long, and where results go."""

    name: str = _spec("", "Optuna study name; default: the file name without .toml")
    storage: str = _spec("sqlite:///studies/optuna.db", "any Optuna storage URL (PostgreSQL for several workers)")
    n_trials: int = _spec(20, "finished (complete or pruned) trials the study ends with, counted across runs and workers; failed trials are replaced (>= 1)", lo=1)
    timeout_s: float = _spec(0.0, "stop starting new trials after this many seconds of this run; 0 = no limit", lo=0)
    objective: str = _spec("val_accuracy", "validation metric to maximise", choices=("val_accuracy", "val_macro_f1"))
    sampler: str = _spec("tpe", "tpe (seeded, multivariate) or random", choices=("tpe", "random"))
    sampler_seed: int = _spec(0, "seed of the sampler (Optuna's randomness)")
    pruner: str = _spec("median", "early stop of poor trials per epoch", choices=("median", "hyperband", "none"))
    pruner_warmup_epochs: int = _spec(1, "median pruner: never prune before this many epochs", lo=0)
    keep_checkpoints: str = _spec("best", "trained models kept on disk: best, all, or none (then no holdout scores)", choices=("best", "all", "none"))
    output_dir: str = _spec("studies", "results go to <output_dir>/<name>/ (report, checkpoints, config)")
    device: str = _spec("auto", "auto | cpu | cuda | cuda:N")
    heartbeat_s: int = _spec(30, "RDB heartbeat interval: a trial silent for 2x this is retried (seconds, >= 1)", lo=1)
    report_top_k: int = _spec(5, "best trials scored on the holdout and shown in the report (>= 1)", lo=1)


@dataclass(frozen=True)
class DataSection:
    """``[data]``: which images, at which resolution, and the fixed holdout."""

    path: str = _spec("demo", "dataset folder, Stanford Cars devkit folder, manifest.csv, or 'demo' (embedded digits)")
    format: str = _spec("auto", "how to read path", choices=("auto", "folders", "stanford-devkit", "manifest"))
    image_size: int = _spec(224, "training resolution in pixels (16..1024)", lo=16, hi=1024)
    resize_mode: str = _spec("center_crop", "center_crop (shorter side, then centre) or stretch", choices=("center_crop", "stretch"))
    holdout_fraction: float = _spec(0.2, "share drawn as holdout when the dataset has no test/ folder (0 <= f < 1)", lo=0.0, hi=0.95)
    split_seed: int = _spec(0, "seed of the holdout draw and of every train/validation split")
    cache_dir: str = _spec("studies/cache", "where decoded images are cached")
    demo_per_class: int = _spec(0, "demo only: images per digit class (0 = all 1,797 images)", lo=0)


@dataclass(frozen=True)
class TrainSection:
    """``[train]``: fixed training settings (a key searched in ``[search]`` may not appear here)."""

    weights: str = _spec("auto", "imagenet | none | auto | path to a local ResNet-50 state_dict")
    unfreeze_depth: int = _spec(0, "trainable stages from the top, 0 (head only) .. 5 (everything)", lo=0, hi=5)
    lr: float = _spec(1e-3, "peak learning rate of the head (> 0)", lo=0.0, lo_open=True)
    epochs: int = _spec(5, "passes over the training split (>= 1)", lo=1)
    train_ratio: float = _spec(0.8, "share of the non-holdout pool used for training, the rest validates (0 < r < 1)", lo=0.0, hi=0.99, lo_open=True)
    batch_size: int = _spec(64, "images per optimiser step (>= 2)", lo=2)
    optimizer: str = _spec("adamw", "adamw or sgd (Nesterov momentum)", choices=("adamw", "sgd"))
    momentum: float = _spec(0.9, "SGD momentum (0..1)", lo=0.0, hi=1.0)
    weight_decay: float = _spec(1e-4, "decoupled weight decay (>= 0)", lo=0.0)
    backbone_lr_mult: float = _spec(0.1, "backbone lr = lr x this (0..1]", lo=0.0, hi=1.0, lo_open=True)
    label_smoothing: float = _spec(0.0, "cross-entropy label smoothing (0..1)", lo=0.0, hi=0.99)
    warmup_epochs: float = _spec(0.0, "linear warm-up before the cosine decay, in epochs (>= 0)", lo=0.0)
    augment: bool = _spec(True, "random-resized crop + horizontal flip on the device while training")
    crop_scale_min: float = _spec(0.35, "smallest random-crop area, as a share of the image (0..1]", lo=0.0, hi=1.0, lo_open=True)
    train_seed: int = _spec(0, "seed of head init, batch order and augmentation")
    eval_batch_size: int = _spec(256, "images per forward pass when evaluating (>= 1)", lo=1)
    compile: bool = _spec(False, "torch.compile the trainable stages (one-off compile per trial; for long GPU trials)")
    feature_views: int = _spec(4, "views per image in the frozen-activation cache (centre, mirror, crops); 0 = no cache", lo=0, hi=64)
    feature_memory_fraction: float = _spec(0.5, "largest share of free GPU (or host) memory the frozen-activation cache may take", lo=0.0, hi=0.95)


#: Searched dimensions: (kind, allowed values). "log"/"float"/"int" take [low, high]; "choice" a list.
SEARCHABLE: dict[str, str] = {
    "unfreeze_depth": "choice",
    "lr": "log",
    "epochs": "int",
    "train_ratio": "float",
    "weight_decay": "log",
    "batch_size": "choice",
    "label_smoothing": "float",
    "backbone_lr_mult": "log",
    "optimizer": "choice",
}


@dataclass(frozen=True)
class SearchSection:
    """``[search]``: the space Optuna explores; anything not listed here is fixed by ``[train]``.

    Without a ``[search]`` table the four core dimensions (unfreeze_depth, lr, epochs,
    train_ratio) are searched over the default ranges below, except those ``[train]`` fixes.
    A ``[search]`` table lists exactly what is searched: core dimensions it leaves out take
    their ``[train]`` values, and the optional ones (weight_decay, batch_size, label_smoothing,
    backbone_lr_mult, optimizer) are searched only when listed.
    """

    space: dict[str, Any] = field(default_factory=lambda: {
        "unfreeze_depth": [0, 1, 2, 3, 4, 5],
        "lr": [1e-4, 1e-2],
        "epochs": [2, 10],
        "train_ratio": [0.5, 0.9],
    })


@dataclass(frozen=True)
class StudyConfig:
    study: StudySection
    data: DataSection
    train: TrainSection
    search: SearchSection
    source: str = "<defaults>"

    @property
    def result_dir(self) -> Path:
        return Path(self.study.output_dir) / self.study.name

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "study": dataclasses.asdict(self.study),
            "data": dataclasses.asdict(self.data),
            # Searched keys are left out of [train]: their values come from each trial.
            "train": {k: v for k, v in dataclasses.asdict(self.train).items() if k not in self.search.space},
            "search": dict(self.search.space),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def with_overrides(self, **sections: dict[str, Any]) -> StudyConfig:
        """A copy with ``section={key: value}`` overrides applied and validated again."""
        raw = self.to_dict()
        for name, values in sections.items():
            raw[name].update({k: v for k, v in values.items() if v is not None})
        return from_dict(raw, source=self.source)


# --------------------------------------------------------------------------- validation


def _check_value(where: str, key: str, value, f: dataclasses.Field) -> Any:
    expected = type(f.default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} {key}: expected {expected.__name__}, got {value!r} ({f.metadata['doc']})")
    m = f.metadata
    if m["choices"] and value not in m["choices"]:
        raise ConfigError(f"{where} {key}: must be one of {', '.join(map(str, m['choices']))}, got {value!r}")
    too_low = m["lo"] is not None and (value <= m["lo"] if m["lo_open"] else value < m["lo"])
    too_high = m["hi"] is not None and value > m["hi"]
    if too_low or too_high or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{where} {key}: {value!r} is out of range ({m['doc']})")
    return value


def _section(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where} {unknown[0]}: unknown key (known: {', '.join(fields)})")
    return cls(**{k: _check_value(where, k, v, fields[k]) for k, v in raw.items()})


def _search(raw: dict, where: str) -> SearchSection:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    space = dict(SearchSection().space) if not raw else {}
    train_fields = {f.name: f for f in dataclasses.fields(TrainSection)}
    for key, value in raw.items():
        kind = SEARCHABLE.get(key)
        if kind is None:
            raise ConfigError(f"{where} {key}: not searchable (searchable: {', '.join(SEARCHABLE)})")
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where} {key}: expected a non-empty list, got {value!r}")
        if kind == "choice":
            values = [_check_value(where, key, v, train_fields[key]) for v in value]
            if len(set(values)) != len(values):
                raise ConfigError(f"{where} {key}: choices must be distinct, got {value!r}")
            space[key] = values
            continue
        if len(value) != 2:
            raise ConfigError(f"{where} {key}: expected [low, high], got {value!r}")
        low, high = (_check_value(where, key, v, train_fields[key]) for v in value)
        if low > high or (kind == "log" and low <= 0):
            raise ConfigError(f"{where} {key}: expected [low, high] with {'0 < ' if kind == 'log' else ''}low <= high, got {value!r}")
        space[key] = [low, high]
    return SearchSection(space=space)


def from_dict(raw: dict, source: str = "<dict>") -> StudyConfig:
    """Build and validate a config from parsed TOML (or a saved ``to_dict()``)."""
    raw = dict(raw)
    raw.pop("source", None)
    unknown = sorted(set(raw) - {"study", "data", "train", "search"})
    if unknown:
        raise ConfigError(f"{source}: [{unknown[0]}]: unknown table (known: study, data, train, search)")
    study = _section(StudySection, raw.get("study", {}), f"{source}: [study]")
    data = _section(DataSection, raw.get("data", {}), f"{source}: [data]")
    train = _section(TrainSection, raw.get("train", {}), f"{source}: [train]")
    search = _search(raw.get("search", {}), f"{source}: [search]")
    fixed = set(raw.get("train", {}))
    both = sorted(fixed & set(raw.get("search", {})))
    if both:
        raise ConfigError(f"{source}: [train] {both[0]}: also listed in [search]; keep it in one table")
    if not raw.get("search"):  # default space: what [train] fixes is not searched
        search = SearchSection(space={k: v for k, v in search.space.items() if k not in fixed})
    _check_choice_strings(study, train, source)
    if not study.name:
        study = dataclasses.replace(study, name=Path(source).stem if source.endswith(".toml") else "study")
    return StudyConfig(study=study, data=data, train=train, search=search, source=source)


def _check_choice_strings(study: StudySection, train: TrainSection, source: str) -> None:
    """Keys whose strings name a choice or a file: caught here rather than mid-study."""
    device = study.device
    if device not in DEVICE_CHOICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"{source}: [study] device: must be auto, cpu, cuda or cuda:N, got {device!r}")
    weights = train.weights
    if weights not in WEIGHT_CHOICES and not Path(weights).expanduser().is_file():
        raise ConfigError(
            f"{source}: [train] weights: must be imagenet, none, auto or the path of a ResNet-50 state_dict; "
            f"no file {weights!r}"
        )


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study file.

    Raises:
        ConfigError: the file is missing, is not TOML, or has a bad key (named in the message).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: study file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    return from_dict(raw, source=str(path))


def describe_keys() -> str:
    """Every key with its default and documentation (used by ``--help`` and the README)."""
    lines = []
    for title, cls in (("study", StudySection), ("data", DataSection), ("train", TrainSection)):
        lines.append(f"[{title}]")
        for f in dataclasses.fields(cls):
            lines.append(f"  {f.name} = {f.default!r}: {f.metadata['doc']}")
    lines.append("[search]  " + ", ".join(f"{k} ({v})" for k, v in SEARCHABLE.items()))
    return "\n".join(lines)
