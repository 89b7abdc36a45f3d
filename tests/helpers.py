"""Shared builders for study tests: tiny study configs on the embedded digits."""

from __future__ import annotations

import copy
from pathlib import Path

from transferstudy.config import StudyConfig, from_dict

TINY = {
    "study": {"name": "tiny", "n_trials": 2, "pruner": "none", "heartbeat_s": 2, "report_top_k": 2},
    "data": {"path": "demo", "image_size": 16, "demo_per_class": 12},
    "train": {"weights": "none", "batch_size": 32},
    "search": {"unfreeze_depth": [0, 1], "lr": [1e-3, 1e-2], "epochs": [1, 2], "train_ratio": [0.6, 0.8]},
}


def tiny_raw(root: Path, **sections) -> dict:
    """A tiny study (16 px digits, 12 per class) whose files all live under ``root``."""
    raw = copy.deepcopy(TINY)
    raw["study"].update(storage=f"sqlite:///{root}/optuna.db", output_dir=str(root))
    raw["data"]["cache_dir"] = str(root / "cache")
    for name, values in sections.items():
        raw[name].update(values)
    return raw


def tiny_config(root: Path, **sections) -> StudyConfig:
    return from_dict(tiny_raw(root, **sections), source=str(root / "tiny.toml"))


def write_toml(path: Path, raw: dict) -> Path:
    """Write a study dict as TOML (the subset study files use)."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for table, values in raw.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
