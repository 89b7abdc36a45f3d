"""The HTML study report: a tiny real study, a synthetic 196-class study, and the flow CLI.

The builders here are shared with ``test_report_browser.py``; each writes its study once per
test session under pytest's base temp folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import types
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import optuna
import pytest
from helpers import built_once, shared_root, tiny_config
from optuna.distributions import (
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from flows.study import reproduce_command
from transferstudy import report
from transferstudy.config import from_dict
from transferstudy.metrics import score, top_confused_pairs
from transferstudy.report import findings, html, sections

REPO = Path(__file__).resolve().parents[1]
SECTION_IDS = (
    "header",
    "findings",
    "confirmation",
    "model-card",
    "best-trials",
    "holdout",
    "curves",
    "effects",
    "optuna",
    "misclassified",
)
FIGURES = (
    "confusion",
    "per-class-f1",
    "learning-curves",
    "effects",
    "optimization-history",
    "param-importances",
    "parallel-coordinates",
    "slice",
    "timeline",
)
#: Largest report we are happy to mail (plotly.js alone is about 4.8 MB).
MAX_REPORT_BYTES = 8_000_000


# --------------------------------------------------------------------------- study builders


def _ensure_prepare_module() -> None:
    """``transferstudy.prepare`` is written in parallel; fall back to plain class folders."""
    try:
        import transferstudy.prepare  # noqa: F401
    except ImportError:
        from transferstudy.datasets import scan_folders

        shim = types.ModuleType("transferstudy.prepare")
        shim.open_dataset = lambda path, fmt="auto": scan_folders(path)
        sys.modules["transferstudy.prepare"] = shim


def build_tiny_study(root: Path) -> tuple[str, str]:
    """A real 3-trial study (16 px digits, 10 per class, random init) with holdout scores; once per root."""
    url = f"sqlite:///{root}/optuna.db"
    with built_once(root) as done:
        if not done:
            _build_tiny_study(root)
    return url, "tiny"


def _build_tiny_study(root: Path) -> None:
    from transferstudy import study as study_mod

    _ensure_prepare_module()
    root.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(root, study={"name": "tiny", "n_trials": 3, "report_top_k": 3}, data={"demo_per_class": 10})
    here = Path.cwd()
    os.chdir(root)  # the demo digits are written under ./studies/data
    try:
        study = study_mod.run_study(cfg, command=reproduce_command(cfg))
        study_mod.score_holdout(study, cfg, study_mod.decode_dataset(cfg, show_progress=False))
    finally:
        os.chdir(here)


def car_names(n: int) -> list[str]:
    """Stanford-Cars-like class names (about 40 characters each)."""
    bodies = ("Sedan", "Coupe", "Convertible", "SUV", "Hatchback", "Crew Cab", "Minivan")
    return [f"Brand{i // 4:02d} Model-{i:03d} {bodies[i % len(bodies)]} {2000 + i % 13}" for i in range(n)]


DEPTH_GAIN = {0: 0.0, 1: 0.12, 2: 0.18, 3: 0.15, 4: 0.08, 5: 0.04}
DISTRIBUTIONS = {
    "unfreeze_depth": CategoricalDistribution([0, 1, 2, 3, 4, 5]),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "epochs": IntDistribution(2, 10),
    "train_ratio": FloatDistribution(0.5, 0.9),
}


def synthetic_config(root: Path, name: str, url: str) -> dict:
    return from_dict(
        {
            "study": {"name": name, "storage": url, "n_trials": 40, "output_dir": str(root), "report_top_k": 5},
            "data": {"path": "/data/stanford-cars", "cache_dir": str(root / "cache")},
            "train": {"weights": "imagenet"},
            "search": {
                "unfreeze_depth": [0, 1, 2, 3, 4, 5],
                "lr": [1e-4, 1e-2],
                "epochs": [2, 10],
                "train_ratio": [0.5, 0.9],
            },
        },
        source="studies/stanford_cars.toml",
    ).to_dict()


def synthetic_trial(
    number: int, rng: np.random.Generator, state: TrialState, start: datetime
) -> optuna.trial.FrozenTrial:
    """One trial with user attrs shaped like ``study.Objective`` writes them."""
    params = {
        "unfreeze_depth": int(rng.integers(0, 6)),
        "lr": float(10 ** rng.uniform(-4, -2)),
        "epochs": int(rng.integers(2, 11)),
        "train_ratio": float(rng.uniform(0.5, 0.9)),
    }
    final = (
        0.55
        + DEPTH_GAIN[params["unfreeze_depth"]]
        + 0.2 * (params["train_ratio"] - 0.5)
        - 0.04 * abs(math.log10(params["lr"]) + 3)
    )
    final += float(rng.normal(0, 0.01))
    run = params["epochs"] if state == TrialState.COMPLETE else int(rng.integers(1, params["epochs"]))
    per_epoch = 20.0 + 12.0 * params["unfreeze_depth"]
    history = [
        {
            "epoch": e,
            "train_loss": 5.0 * math.exp(-0.4 * e),
            "train_acc": final * e / params["epochs"],
            "val_loss": 4.0 * math.exp(-0.3 * e),
            "val_acc": final * (1 - 0.5**e) / (1 - 0.5 ** params["epochs"]),
            "val_f1": 0.97 * final * (1 - 0.5**e),
            "lr": params["lr"] * (1 - e / (params["epochs"] + 1)),
            "seconds": per_epoch,
            "images_per_s": 6500 / per_epoch * 10,
        }
        for e in range(1, run + 1)
    ]
    pool = 8144
    train = round(pool * params["train_ratio"])
    attrs = {
        "device": "cuda:0 (NVIDIA H200)",
        "weights": "imagenet",
        "history": history,
        "split_sizes": {"train": train, "val": pool - train, "holdout": 8041},
        "train_seconds": per_epoch * run,
    }
    if state == TrialState.COMPLETE:
        attrs.update(
            val_accuracy=history[-1]["val_acc"],
            val_macro_f1=history[-1]["val_f1"],
            images_per_s=6500 / per_epoch * 10,
            best_epoch=run,
            checkpoint=f"/tmp/ck/trial_{number:04d}.pt",
        )
    if state == TrialState.FAIL:
        attrs["error"] = "OutOfMemoryError: CUDA out of memory"
    trial = optuna.trial.create_trial(
        state=state,
        value=history[-1]["val_acc"] if state == TrialState.COMPLETE else None,
        params=params,
        distributions=DISTRIBUTIONS,
        user_attrs=attrs,
        intermediate_values={h["epoch"]: h["val_acc"] for h in history},
    )
    trial.datetime_start = start
    trial.datetime_complete = start + timedelta(seconds=per_epoch * run + 5)
    return trial


def synthetic_holdout(best: int, names: list[str], rng: np.random.Generator) -> dict:
    """The best trial's holdout scores, shaped like ``study.score_holdout`` stores them."""
    n = len(names)
    y = np.repeat(np.arange(n), 41)
    wrong = rng.random(len(y)) > 0.82
    neighbour = np.clip(y + rng.integers(-3, 4, len(y)), 0, n - 1)
    pred = np.where(wrong, neighbour, y)
    probs = np.full((len(y), n), 0.1 / n)
    probs[np.arange(len(y)), pred] = 0.9
    scores = score(y, probs, n)
    bad = np.flatnonzero(pred != y)
    return {
        "trial": best,
        "rank": 0,
        **scores.to_dict(),
        "confused_pairs": top_confused_pairs(scores.confusion, names, 20),
        "misclassified": [{"row": int(i % 60), "true": int(y[i]), "pred": int(pred[i]), "p": 0.9} for i in bad[:200]],
    }


def write_fake_cache(folder: Path, rows: int = 60, size: int = 224) -> None:
    """A decode cache of noisy images (the worst case for PNG thumbnails)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    np.save(folder / "images.npy", rng.integers(0, 256, size=(rows, size, size, 3), dtype=np.uint8))
    (folder / "meta.json").write_text(
        json.dumps({"paths": [f"/data/stanford-cars/cars_test/{i:05d}.jpg" for i in range(rows)]})
    )


def build_synthetic_study(
    root: Path, num_classes: int = 196, n_trials: int = 40, name: str = "cars196"
) -> tuple[str, str]:
    """A study as a long Stanford Cars run would leave it: complete, pruned and failed trials; once per root."""
    url = f"sqlite:///{root}/optuna.db"
    with built_once(root) as done:
        if not done:
            _build_synthetic_study(root, url, num_classes, n_trials, name)
    return url, name


def _build_synthetic_study(root: Path, url: str, num_classes: int, n_trials: int, name: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    start = datetime(2025, 3, 1, 9, 0, 0)
    for number in range(n_trials):
        state = TrialState.FAIL if number == 7 else (TrialState.PRUNED if number % 4 == 3 else TrialState.COMPLETE)
        trial = synthetic_trial(number, rng, state, start)
        study.add_trial(trial)
        start = trial.datetime_complete
    names = car_names(num_classes)
    cache = root / "cache" / "0123456789abcdef0123"
    write_fake_cache(cache)
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    attrs = {
        "config": synthetic_config(root, name, url),
        "dataset": {
            "path": "/data/stanford-cars",
            "source": "stanford-devkit",
            "num_classes": num_classes,
            "class_names": names,
            "num_images": 16185,
            "pool_images": 8144,
            "holdout_images": 8041,
            "holdout_protocol": "the dataset's own test/ folder is the fixed holdout (published-benchmark protocol)",
            "image_size": 224,
            "fingerprint": cache.name,
            "cache_dir": str(cache),
            "problems": [
                ["/data/stanford-cars/cars_train/07389.jpg", "not an image (format not recognised)"],
                ["/data/stanford-cars/cars_train/08144.jpg", "empty file (0 bytes)"],
            ],
            "warnings": [f"classes with a single training image (absent from validation): {names[5]}"],
        },
        "command": "python -m flows.study --config studies/stanford_cars.toml --study-name cars196 --storage " + url,
        "runs": [{"started": "2025-03-01T09:00:00+0000", "device": "cuda:0 (NVIDIA H200)", "argv": ["flows/study.py"]}],
        "weights": {"requested": "imagenet", "used": "imagenet", "warning": None},
        "holdout": synthetic_holdout(complete[0].number, names, rng),
        "holdout_top": {
            str(t.number): {"accuracy": 0.8, "top5": 0.95, "macro_f1": 0.79, "weighted_f1": 0.8} for t in complete[:5]
        },
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> tuple[str, str, Path]:
    root = shared_root(tmp_path_factory, "report-tiny")
    return (*build_tiny_study(root), root)


@pytest.fixture(scope="session")
def cars_study(tmp_path_factory) -> tuple[str, str, Path]:
    root = shared_root(tmp_path_factory, "report-cars196")
    return (*build_synthetic_study(root), root)


# --------------------------------------------------------------------------- helpers


def figures_in(page: str) -> list[str]:
    return re.findall(r'data-figure="([^"]+)"', page)


def section_text(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"section {sid} missing"
    return match.group(1)


# --------------------------------------------------------------------------- tests


def test_tiny_study_report_has_every_section_and_plot(tiny_study):
    url, name, root = tiny_study
    path = report.build_report(url, name)
    assert path == root / "tiny" / "report.html"  # <output_dir>/<name>/report.html
    page = path.read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page and f'href="#{sid}"' in page
    assert figures_in(page) == list(FIGURES)
    assert page.count("Plotly.newPlot(") == len(FIGURES)
    assert page.count("plotly.js v") == 1  # the library, inline, exactly once
    assert not re.search(r"<script[^>]+src=|<link ", page)  # nothing to fetch: opens offline
    assert 'id="js-errors"' in page
    header = section_text(page, "header")
    assert 'id="weights-warning"' in header and "NOT pretrained" in header
    assert "python -m flows.study" in header and "3 complete, 0 pruned, 0 failed" in header
    assert "holdout" in header and "digits-10" in header
    best = section_text(page, "best-trials")
    assert best.count("<tr>") == 1 + 3 and "holdout top-5" in best and 'class="sortable"' in best
    assert "data:image/png;base64," in section_text(page, "misclassified")
    findings = section_text(page, "findings")
    for topic in (
        "Best setting",
        "Unfreeze depth",
        "Training data",
        "Learning rate",
        "Epochs",
        "Pruning: no trial was pruned",
    ):
        assert topic in findings


def test_196_class_report_is_readable_and_small(cars_study, tmp_path):
    url, name, _ = cars_study
    path = report.build_report(url, name, out=tmp_path / "cars.html")
    size = path.stat().st_size
    print(f"196-class report: {size / 1e6:.2f} MB")
    assert size < MAX_REPORT_BYTES
    page = path.read_text()
    assert figures_in(page) == list(FIGURES)
    holdout = section_text(page, "holdout")
    assert '"showticklabels":false' in holdout  # no unreadable tick labels at 196 classes
    assert "Brand48 Model-195" in holdout  # names are still there, for the hover
    assert "<details><summary>Classification report" in holdout  # collapsed for many classes
    pairs = re.search(r"Most confused class pairs</h3>(<table.*?</table>)", holdout, re.S).group(1)
    assert pairs.count("<tr>") == 1 + 20
    assert section_text(page, "misclassified").count("<img ") == sections.MAX_THUMBS
    header = section_text(page, "header")
    assert "weights-warning" not in header and "2 file(s) skipped" in header and "single training image" in header
    assert "30 complete, 9 pruned, 1 failed" in header


def test_findings_are_computed_from_the_trials(cars_study):
    url, name, _ = cars_study
    data = report.load_data(report.open_study(url, name))
    # No confirmation runs: the search's best trial per depth is one selected run, so no depth is named.
    depth = findings.depth_finding(data)
    assert "<b>no evidence</b>" in depth and "No depth is named" in depth
    # The synthetic objective grows with train_ratio (+2 points per +0.1): the regression, adjusted
    # for the other searched dimensions, must say so with its interval and n.
    ratio = findings.data_finding(data)
    assert "more training data <b>helped</b>" in ratio and "95% CI" in ratio and f"n={len(data.complete)}" in ratio
    assert "each on its own validation split" in ratio  # these trials record no common-subset score
    pruned = data.of_state(TrialState.PRUNED)
    saved = sum(
        (t.params["epochs"] - len(t.user_attrs["history"])) * t.user_attrs["history"][0]["seconds"] for t in pruned
    )
    assert (
        f"{len(pruned)} pruned trial(s) saved an estimated <b>{html.fmt_duration(saved)}</b>"
        in findings.pruning_finding(data)
    )


def test_thin_study_gets_notes_instead_of_plots(tmp_path):
    """One complete trial, no holdout, no dataset info: notes, never a crash."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="thin", storage=url, direction="maximize")
    study.add_trial(synthetic_trial(0, np.random.default_rng(0), TrialState.COMPLETE, datetime(2025, 1, 1)))
    path = report.build_report(url, "thin", out=tmp_path / "thin.html")
    page = path.read_text()
    assert "parameter importances could not be drawn" in page and "at least 2 complete trials" in page
    assert "No holdout scores stored" in section_text(page, "holdout")
    assert "No holdout scores stored" in section_text(page, "misclassified")
    assert "param-importances" not in figures_in(page)


def test_header_names_classes_a_drawn_holdout_has_no_image_of(tmp_path, make_dataset):
    # class_2 keeps 2 images: a 20% draw gives the holdout round(0.4) = 0 of them (the pool keeps
    # at least one of each class), so the report has no holdout score for it and must say so.
    from transferstudy import study as study_mod

    root = make_dataset("pool", num_classes=3, per_class=10, test_per_class=None)
    for extra in sorted((root / "class_2").iterdir())[2:]:
        extra.unlink()
    cfg = tiny_config(tmp_path, data={"path": str(root), "holdout_fraction": 0.2})
    summary = study_mod.decode_dataset(cfg, show_progress=False).summary(cfg)
    note = "classes absent from the holdout (too few images for a 20% draw): class_2"
    assert note in summary["warnings"]
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="small-class", storage=url, direction="maximize")
    study.add_trial(synthetic_trial(0, np.random.default_rng(0), TrialState.COMPLETE, datetime(2025, 1, 1)))
    study.set_user_attr("dataset", summary)
    page = report.build_report(url, "small-class", out=tmp_path / "r.html").read_text()
    assert html.esc(note) in section_text(page, "header")


def test_missing_cache_leaves_a_note(cars_study, tmp_path):
    url, name, root = cars_study
    copy = tmp_path / "optuna.db"
    shutil.copyfile(root / "optuna.db", copy)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{copy}")
    study.set_user_attr("dataset", {**study.user_attrs["dataset"], "cache_dir": str(tmp_path / "gone")})
    page = report.build_report(f"sqlite:///{copy}", name, out=tmp_path / "r.html").read_text()
    assert "Thumbnails unavailable" in section_text(page, "misclassified")


def test_unknown_study_and_missing_storage_are_clear_errors(cars_study, tmp_path):
    url, name, _ = cars_study
    with pytest.raises(ValueError, match=f"no study 'nope'.*{name}"):
        report.build_report(url, "nope")
    with pytest.raises(FileNotFoundError, match="no Optuna storage"):
        report.build_report(f"sqlite:///{tmp_path}/missing.db", name)
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.slow
def test_flow_cli_rebuilds_the_report_from_storage(tiny_study, prefect_server, tmp_path):
    from helpers import run_cli
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.report import main

    url, name, _ = tiny_study
    out = tmp_path / "rebuilt" / "report.html"
    with temporary_settings({PREFECT_API_URL: prefect_server}):  # the report flow runs through the server
        code, stdout, stderr = run_cli(main, ["--study", name, "--storage", url, "--out", str(out)])
    assert code == 0, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == str(out)
    page = out.read_text()
    assert figures_in(page) == list(FIGURES) and all(f'id="{sid}"' in page for sid in SECTION_IDS)


def test_flow_cli_reports_a_missing_study_in_one_line(tiny_study, tmp_path):
    from helpers import run_cli

    from flows.report import main

    url, _, _ = tiny_study
    code, _, err = run_cli(main, ["--study", "nope", "--storage", url])
    assert code == 2 and err.strip().startswith("error: no study 'nope'") and err.count("\n") == 1
