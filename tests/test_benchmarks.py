"""The benchmark scripts stay runnable: each runs end to end at toy sizes on the CPU.

They are timed by hand (figures in benchmarks/RESULTS.md), so nothing here checks speed; this
checks that they finish and write what RESULTS.md is made from.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> str:
    """Run a benchmark script as ``python <script> <args>`` would, in this process (one torch
    thread, no second import of torch); its standard output."""
    script, *argv = args
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(sys, "argv", [str(ROOT / script), *argv])
        mp.setattr(sys, "path", list(sys.path))  # the script's own sys.path entries go with it
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return out.getvalue()


def test_bench_study_runs_both_contenders_interleaved_and_the_floor(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))
        bench = runpy.run_path(str(ROOT / "benchmarks/bench_study.py"))  # read, not run
    assert bench["reference"](1, 1) == [(d, 1) for d in range(6)]  # the reference study has every depth
    out = _run(  # 8 one-epoch trainings (depths 0 and 5, two contenders, two runs) and the compute floor
        [
            "benchmarks/bench_study.py",
            "--out",
            str(tmp_path),
            "--classes",
            "2",
            "--per-class",
            "4",
            "--val-per-class",
            "2",
            "--source-px",
            "48",
            "--image-size",
            "16",
            "--batch-size",
            "8",
            "--repeats",
            "2",
            "--epochs",
            "1",
            "--per-depth",
            "1",
            "--depths",
            "0",
            "5",
            "--floor-steps",
            "1",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert "## median over 2 runs" in out and "## compute floor" in out
    result = json.loads((tmp_path / "bench_study.json").read_text())
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        names = [r["name"] for r in run["results"]]
        assert names == ["transferstudy", "naive (notebook)"]
        for r in run["results"]:
            assert [(t["depth"], t["epochs"]) for t in r["trials"]] == [(0, 1), (5, 1)]
            assert all(t["seconds"] > 0 for t in r["trials"])
    assert sorted(result["compute_floor"]) == ["5"]  # the floor of each depth that trains a stage
    # Each class keeps its colour in test/, so the validation split is learnable.
    train_px = _mean_colour(tmp_path / "data" / "train" / "class_001")
    test_px = _mean_colour(tmp_path / "data" / "test" / "class_001")
    assert abs(train_px - test_px).max() < 40


def _mean_colour(folder: Path):
    import numpy as np
    from PIL import Image

    return np.mean([np.asarray(Image.open(p)).reshape(-1, 3).max(0) for p in sorted(folder.glob("*.jpg"))], axis=0)


def test_bench_gpu_smoke_runs_on_the_cpu(tmp_path):
    out = _run(["benchmarks/bench_gpu.py", "--smoke", "--epochs", "1", "--out", str(tmp_path / "gpu.json")])
    assert "projected 20-trial study" in out
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["depth"] for r in result["rows"]] == list(range(6))


def test_bench_views_compares_view_counts_with_no_cache(tmp_path):
    out = _run(
        [
            "benchmarks/bench_views.py",
            "--out",
            str(tmp_path),
            "--views",
            "1",
            "2",
            "--depths",
            "1",
            "--seeds",
            "1",
            "--per-class",
            "6",
            "--epochs",
            "1",
            "--image-size",
            "16",
            "--device",
            "cpu",
        ]
    )
    assert "| no cache |" in out and "| 2 |" in out
    trials = json.loads((tmp_path / "bench_views.json").read_text())["trials"]
    assert sorted(t["views"] for t in trials) == [0, 1, 2]
    by_views = {t["views"]: t for t in trials}
    assert by_views[0]["cache_mb"] == 0.0 and by_views[2]["cache_mb"] == 2 * by_views[1]["cache_mb"] > 0
