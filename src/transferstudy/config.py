"""The study configuration: one typed model, from the TOML file to the Prefect UI.

A study file (``studies/*.toml``) has six tables, ``[study]``, ``[data]``, ``[train]``,
``[search]``, ``[confirm]`` and ``[refit]``; every key is optional and documented below where it is defined (units, range,
default). The same model is:

* the schema of the study file: unknown keys and out-of-range values are rejected with one
  line naming the file and the key, e.g.::

      studies/demo.toml: [search] lr: expected [low, high] with 0 < low <= high, got [0.1, 0.001]

* the ``--help`` text (``describe_keys``) and the generic override ``--set section.key=value``
  (``apply_overrides``);
* the resolved configuration saved with the study (``config.json``, ``config.toml``, the
  study's user attrs);
* the parameter of the Prefect flow: a deployment's *Custom run* shows it as a validated form,
  and a scheduled run needs no file on the machine that runs it;
* the training settings of a trial (``TrainSection``: ``train.fit`` reads it directly) and the
  kinds of the searched dimensions (``SEARCHABLE``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: Where committed study definitions live; ``python -m flows.study`` defaults to demo.toml.
STUDIES_DIR = Path("studies")
DEFAULT_CONFIG = STUDIES_DIR / "demo.toml"

Objective = Literal["val_accuracy", "val_macro_f1"]
Sampler = Literal["tpe", "random"]
Pruner = Literal["median", "hyperband", "none"]
KeepCheckpoints = Literal["best", "all", "none"]
Format = Literal["auto", "folders", "stanford-devkit", "manifest"]
ResizeMode = Literal["center_crop", "stretch"]
Optimizer = Literal["adamw", "sgd"]

#: The choices, for code that lists or checks them (each written once, in the types above).
FORMATS: tuple[str, ...] = get_args(Format)
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
#: Named weights (anything else is the path of a local ResNet-50 state_dict) and devices.
WEIGHT_CHOICES = ("imagenet", "none", "auto")
DEVICE_CHOICES = ("auto", "cpu", "cuda")  # or cuda:N
#: Study-file tables, in file order.
TABLES = ("study", "data", "train", "search", "confirm", "refit")


class ConfigError(ValueError):
    """A study file is unusable; str() is one line naming the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class StudySection(_Section):
    """``[study]``: what to optimise, for how long, and where results go."""

    name: str = Field("", description="Optuna study name; default: the file name without .toml")
    storage: str = Field(
        "sqlite:///studies/optuna.db",
        description="any Optuna storage URL (SQLite for one node, PostgreSQL for several machines)",
    )
    n_trials: int = Field(
        20,
        ge=1,
        description="finished (complete or pruned) trials the study ends with, counted across runs "
        "and workers; failed trials are replaced (>= 1)",
    )
    timeout_s: float = Field(
        0.0, ge=0, description="stop starting new trials after this many seconds of this run; 0 = no limit"
    )
    objective: Objective = Field("val_accuracy", description="validation metric to maximise")
    sampler: Sampler = Field("tpe", description="tpe (seeded, multivariate) or random")
    sampler_seed: int = Field(0, description="seed of the sampler (Optuna's randomness)")
    pruner: Pruner = Field(
        "median",
        description="early stop of poor trials, compared at equal progress of their own schedules (README, Pruning)",
    )
    pruner_warmup_epochs: int = Field(
        1,
        ge=0,
        description="median pruner: never prune before this much progress, in epochs of the longest schedule (>= 0)",
    )
    min_trials_per_depth: int = Field(
        1,
        ge=0,
        description="starting design: trials per searched unfreeze depth run first, never pruned, and counted in "
        "n_trials, so every depth gets an answer; 0 = off",
    )
    keep_checkpoints: KeepCheckpoints = Field(
        "best", description="trial checkpoints kept in the artifact store: best, all, or none (then no holdout scores)"
    )
    output_dir: str = Field("studies", description="results go to <output_dir>/<name>/ (report, model, config)")
    artifact_store: str = Field(
        "",
        description="Optuna artifact store for checkpoints, best.pt, the model and the report: a folder "
        "(shared by every worker), or s3://bucket (boto3; AWS_ENDPOINT_URL for other S3 services); "
        "empty: <output_dir>/<name>/artifacts",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    heartbeat_s: int = Field(
        30, ge=1, description="RDB heartbeat interval: a trial silent for 2x this is retried (seconds, >= 1)"
    )
    report_top_k: int = Field(5, ge=1, description="best trials scored on the holdout and shown in the report (>= 1)")

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device not in DEVICE_CHOICES and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {device!r}")
        return device


class DataSection(_Section):
    """``[data]``: which images, at which resolution, and the fixed holdout."""

    path: str = Field(
        "demo", description="dataset folder, Stanford Cars devkit folder, manifest.csv, or 'demo' (embedded digits)"
    )
    format: Format = Field("auto", description="how to read path")
    image_size: int = Field(224, ge=16, le=1024, description="training resolution in pixels (16..1024)")
    resize_mode: ResizeMode = Field("center_crop", description="center_crop (shorter side, then centre) or stretch")
    holdout_fraction: float = Field(
        0.2, ge=0.0, le=0.95, description="share drawn as holdout when the dataset has no test/ folder (0 <= f < 1)"
    )
    split_seed: int = Field(0, description="seed of the holdout draw and of every train/validation split")
    cache_dir: str = Field("studies/cache", description="where decoded images are cached")
    demo_per_class: int = Field(0, ge=0, description="demo only: images per digit class (0 = all 1,797 images)")


class TrainSection(_Section):
    """``[train]``: the training settings of every trial (a key searched in ``[search]`` may not
    appear here; each trial gets a copy with its searched values, see ``with_params``)."""

    weights: str = Field("auto", description="imagenet | none | auto | path to a local ResNet-50 state_dict")
    unfreeze_depth: int = Field(
        0, ge=0, le=5, description="trainable stages from the top, 0 (head only) .. 5 (everything)"
    )
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate of the head (> 0)")
    epochs: int = Field(5, ge=1, description="passes over the training split (>= 1)")
    train_ratio: float = Field(
        0.8,
        gt=0.0,
        le=0.99,
        description="share of the non-holdout pool used for training, the rest validates (0 < r < 1)",
    )
    batch_size: int = Field(64, ge=2, description="images per optimiser step (>= 2)")
    optimizer: Optimizer = Field("adamw", description="adamw or sgd (Nesterov momentum)")
    momentum: float = Field(0.9, ge=0.0, le=1.0, description="SGD momentum (0..1)")
    weight_decay: float = Field(1e-4, ge=0.0, description="decoupled weight decay (>= 0)")
    backbone_lr_mult: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="backbone lr = lr x this (0..1]; unset: 0.1 for a pretrained backbone, 1.0 for a randomly "
        "initialised one",
    )
    label_smoothing: float = Field(0.0, ge=0.0, le=0.99, description="cross-entropy label smoothing (0..1)")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up before the cosine decay, in epochs (>= 0)")
    augment: bool = Field(
        True,
        description="train on feature_views views of each image (centre, mirror, random-resized crops); false = the centre view only",
    )
    crop_scale_min: float = Field(
        0.35, gt=0.0, le=1.0, description="smallest random-crop area, as a share of the image (0..1]"
    )
    train_seed: int = Field(0, description="seed of head init, batch order and (the study's) crop views")
    eval_batch_size: int = Field(256, ge=1, description="images per forward pass when evaluating (>= 1)")
    autocast: bool = Field(True, description="bf16 autocast on CUDA (no effect on the CPU)")
    compile: bool = Field(
        False, description="torch.compile the trainable stages (one-off compile per trial; for long GPU trials)"
    )
    feature_views: int = Field(
        4,
        ge=1,
        le=64,
        description="the training regime: V fixed views per image (centre, mirror, seeded crops), epoch e "
        "trains on view (e-1) mod V, with or without the frozen-activation cache; 1..64 (1 when augment = false)",
    )
    feature_memory_fraction: float = Field(
        0.5,
        ge=0.0,
        le=0.95,
        description="largest share of free GPU (or host) memory the frozen-activation cache may take; "
        "0 = no cache (same training, frozen stages run every step)",
    )

    @field_validator("feature_views", mode="before")
    @classmethod
    def _feature_views(cls, views: Any) -> Any:
        if views == 0:
            raise ValueError(
                "is the number of training views per image (>= 1); to run without the frozen-activation "
                "cache set feature_memory_fraction = 0"
            )
        return views

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: str) -> str:
        if weights not in WEIGHT_CHOICES and not Path(weights).expanduser().is_file():
            raise ValueError(f"must be imagenet, none, auto or the path of a ResNet-50 state_dict; no file {weights!r}")
        return weights

    def with_params(self, params: dict[str, Any]) -> TrainSection:
        """A copy with one trial's searched values (validated like the file's)."""
        return TrainSection.model_validate({**self.model_dump(), **params})

    def for_backbone(self, pretrained: bool) -> TrainSection:
        """A copy whose unset keys take their default for this backbone (``BACKBONE_DEFAULTS``)."""
        unset = {
            k: pair[0] if pretrained else pair[1] for k, pair in BACKBONE_DEFAULTS.items() if getattr(self, k) is None
        }
        return self.model_copy(update=unset) if unset else self


#: ``[train]`` keys whose default depends on the backbone: key -> (pretrained, randomly initialised).
#: A pretrained backbone needs a gentler lr than its new head; a random one must learn as fast as
#: the head. The other defaults suit both (warm-up, weight decay and crops are no ImageNet
#: specifics); an explicit value in the study file is always kept.
BACKBONE_DEFAULTS: dict[str, tuple[float, float]] = {"backbone_lr_mult": (0.1, 1.0)}


Tta = Literal["none", "flip"]


class RefitSection(_Section):
    """``[refit]``: the model a study ends with, trained once more on the whole pool (train +
    validation) with the chosen configuration, scored on the holdout and exported."""

    enabled: bool = Field(
        True, description="refit the chosen configuration on the whole non-holdout pool and export it"
    )
    seed: int = Field(0, description="train seed of the refit (head init, batch order, augmentation)")
    tta: Tta = Field(
        "none", description="test-time augmentation of the holdout score: none, or flip (mean of image and mirror)"
    )


class ConfirmSection(_Section):
    """``[confirm]``: the confirmation stage after the search (``study.confirm``). The best setting
    of each depth is trained again with several seeds at one common train_ratio (the largest
    searched), so the answer to "which depth?" carries n and an interval instead of resting on
    the luckiest single trial."""

    enabled: bool = Field(
        True, description="retrain the best setting of each depth with several seeds after the search"
    )
    seeds: int = Field(
        3,
        ge=1,
        le=50,
        description="runs per depth (train seeds train_seed + 1 .. + seeds: none repeats a search run; 1..50)",
    )
    depths: list[int] | None = Field(
        None, description="unfreeze depths to confirm (each searched); unset: every searched depth"
    )
    train_ratios: list[float] = Field(
        [],
        description="learning curve: the best setting retrained at each of these train_ratios with the same seeds "
        "(each 0 < r <= 0.99); empty: no sweep",
    )

    @field_validator("depths")
    @classmethod
    def _depths(cls, depths: list[int] | None) -> list[int] | None:
        if depths is not None and (
            not depths or len(set(depths)) != len(depths) or not all(0 <= d <= 5 for d in depths)
        ):
            raise ValueError(f"expected distinct depths in 0..5, got {depths!r}")
        return depths

    @field_validator("train_ratios")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        if len(set(ratios)) != len(ratios) or not all(0.0 < r <= 0.99 for r in ratios):
            raise ValueError(f"expected distinct ratios with 0 < r <= 0.99, got {ratios!r}")
        return sorted(ratios)


#: Searched dimensions and their kind: "log"/"float"/"int" take [low, high]; "choice" a list.
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
#: The space searched when a study file has no ``[search]`` table (less what ``[train]`` fixes).
DEFAULT_SPACE: dict[str, list] = {
    "unfreeze_depth": [0, 1, 2, 3, 4, 5],
    "lr": [1e-4, 1e-2],
    "epochs": [2, 10],
    "train_ratio": [0.5, 0.9],
}

SearchValue = int | float | str


class SearchSection(_Section):
    """``[search]``: the space Optuna explores; anything not listed here is fixed by ``[train]``.

    Without a ``[search]`` table the four core dimensions (unfreeze_depth, lr, epochs,
    train_ratio) are searched over ``DEFAULT_SPACE``, except those ``[train]`` fixes. A
    ``[search]`` table lists exactly what is searched: core dimensions it leaves out take their
    ``[train]`` values, and the optional ones (weight_decay, batch_size, label_smoothing,
    backbone_lr_mult, optimizer) are searched only when listed.
    """

    space: dict[str, list[SearchValue]] = Field(
        default_factory=lambda: dict(DEFAULT_SPACE),
        description="searched key -> [low, high] (log/float/int kinds) or a list of choices",
    )


class StudyConfig(BaseModel):
    """A whole study: the four tables, plus the file it came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study: StudySection = Field(default_factory=StudySection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    search: SearchSection = Field(default_factory=SearchSection)
    refit: RefitSection = Field(default_factory=RefitSection)
    confirm: ConfirmSection = Field(default_factory=ConfirmSection)
    source: str = Field("<defaults>", description="the study file this configuration was read from")

    @property
    def result_dir(self) -> Path:
        return Path(self.study.output_dir) / self.study.name

    def to_dict(self) -> dict:
        """The resolved configuration as plain data (the form ``from_dict`` reads back)."""
        return {
            "source": self.source,
            "study": self.study.model_dump(),
            "data": self.data.model_dump(),
            # Searched keys are left out of [train]: their values come from each trial.
            "train": {k: v for k, v in self.train.model_dump().items() if k not in self.search.space},
            "search": dict(self.search.space),
            "confirm": self.confirm.model_dump(),
            "refit": self.refit.model_dump(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_toml(self) -> str:
        """The resolved configuration as a study file (``load_config`` reads it back)."""
        raw = self.to_dict()
        lines = [f"# resolved configuration of study {self.study.name!r} (from {self.source})"]
        for table in TABLES:
            lines.append(f"\n[{table}]")
            # TOML has no null: an unset key (None, e.g. an automatic default) is left out.
            lines += [f"{key} = {_toml_value(value)}" for key, value in raw[table].items() if value is not None]
        return "\n".join(lines) + "\n"

    def with_overrides(self, **sections: dict[str, Any]) -> StudyConfig:
        """A copy with ``section={key: value}`` overrides applied (None = keep) and validated again."""
        raw = self.to_dict()
        for name, values in sections.items():
            raw[name].update({k: v for k, v in values.items() if v is not None})
        return from_dict(raw, source=self.source)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


# --------------------------------------------------------------------------- validation

_SECTIONS: dict[str, type[_Section]] = {
    "study": StudySection,
    "data": DataSection,
    "train": TrainSection,
    "refit": RefitSection,
    "confirm": ConfirmSection,
}


def _one_line(where: str, cls: type[_Section], err: ValidationError) -> ConfigError:
    """The first validation error as ``<where> <key>: <what> (<the key's documentation>)``."""
    first = err.errors()[0]
    key = str(first["loc"][0]) if first["loc"] else ""
    fields = cls.model_fields
    if first["type"] == "extra_forbidden":
        return ConfigError(f"{where} {key}: unknown key (known: {', '.join(fields)})")
    message = first["msg"].removeprefix("Value error, ")
    doc = f" ({fields[key].description})" if key in fields else ""
    got = f", got {first['input']!r}" if "got" not in message else ""
    return ConfigError(f"{where} {key}: {message}{got}{doc}")


def _section(cls: type[_Section], raw: Any, where: str) -> _Section:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    raw = {k: _coerce_number(cls, k, v) for k, v in raw.items()}
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise _one_line(where, cls, err) from None


def _coerce_number(cls: type[_Section], key: str, value):
    """TOML writes ``1`` for a float key, and ``3.0`` is fine for an int key."""
    field = cls.model_fields.get(key)
    kinds = set(get_args(field.annotation) or [field.annotation]) if field is not None else set()
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if int in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _search(raw: Any, where: str) -> SearchSection:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {raw!r}")
    space = dict(DEFAULT_SPACE) if not raw else {}
    for key, value in raw.items():
        kind = SEARCHABLE.get(key)
        if kind is None:
            raise ConfigError(f"{where} {key}: not searchable (searchable: {', '.join(SEARCHABLE)})")
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where} {key}: expected a non-empty list, got {value!r}")
        values = [getattr(_section(TrainSection, {key: v}, where), key) for v in value]
        if kind == "choice":
            if len(set(values)) != len(values):
                raise ConfigError(f"{where} {key}: choices must be distinct, got {value!r}")
        elif len(values) != 2:
            raise ConfigError(f"{where} {key}: expected [low, high], got {value!r}")
        elif values[0] > values[1] or (kind == "log" and values[0] <= 0):
            zero = "0 < " if kind == "log" else ""
            raise ConfigError(f"{where} {key}: expected [low, high] with {zero}low <= high, got {value!r}")
        space[key] = values
    return SearchSection(space=space)


def from_dict(raw: dict, source: str = "<dict>") -> StudyConfig:
    """Build and validate a config from parsed TOML (or a saved ``to_dict()``)."""
    raw = dict(raw)
    raw.pop("source", None)
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise ConfigError(f"{source}: [{unknown[0]}]: unknown table (known: {', '.join(TABLES)})")
    sections = {name: _section(cls, raw.get(name, {}), f"{source}: [{name}]") for name, cls in _SECTIONS.items()}
    search = _search(raw.get("search", {}), f"{source}: [search]")
    fixed = set(raw.get("train", {}))
    both = sorted(fixed & set(raw.get("search", {})))
    if both:
        raise ConfigError(f"{source}: [train] {both[0]}: also listed in [search]; keep it in one table")
    if not raw.get("search"):  # default space: what [train] fixes is not searched
        search = SearchSection(space={k: v for k, v in search.space.items() if k not in fixed})
    study = sections["study"]
    if not study.name:
        study = study.model_copy(update={"name": Path(source).stem if source.endswith(".toml") else "study"})
    depths = search.space.get("unfreeze_depth", [sections["train"].unfreeze_depth])
    unsearched = [d for d in sections["confirm"].depths or [] if d not in depths]
    if unsearched:
        raise ConfigError(f"{source}: [confirm] depths: {unsearched} not searched (searched: {depths})")
    return StudyConfig(
        study=study,
        data=sections["data"],
        train=sections["train"],
        search=search,
        refit=sections["refit"],
        confirm=sections["confirm"],
        source=source,
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


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); the value is read as TOML, else as a string.

    Raises:
        ConfigError: not of that form, or an unknown table.
    """
    dotted, sep, value = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not (sep and dot and key):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. study.n_trials=40")
    if section not in TABLES:
        raise ConfigError(f"--set {text!r}: unknown table [{section}] (known: {', '.join(TABLES)})")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return section, key.strip(), parsed


def apply_overrides(cfg: StudyConfig, overrides: list[tuple[str, str, Any]]) -> StudyConfig:
    """The config with ``(section, key, value)`` overrides applied, validated again.

    A ``[search]`` override replaces that dimension's range; overriding ``data.path`` alone
    resets ``data.format`` to auto (the new path is detected afresh).
    """
    raw = cfg.to_dict()
    keys = {(section, key) for section, key, _ in overrides}
    if ("data", "path") in keys and ("data", "format") not in keys:
        raw["data"]["format"] = "auto"
    for section, key, value in overrides:
        if section == "train":
            raw["search"].pop(key, None)  # fixing a searched key stops searching it
        raw[section][key] = value
    return from_dict(raw, source=cfg.source)


def describe_keys() -> str:
    """Every key with its default and documentation (used by ``--help`` and the README)."""
    lines = []
    for title, cls in _SECTIONS.items():
        lines.append(f"[{title}]")
        for name, f in cls.model_fields.items():
            default = "(unset)" if f.default is None else repr(f.default)
            lines.append(f"  {name} = {default}: {f.description}")
    lines.append("[search]  " + ", ".join(f"{k} ({v})" for k, v in SEARCHABLE.items()))
    return "\n".join(lines)
