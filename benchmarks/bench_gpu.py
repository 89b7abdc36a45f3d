"""GPU throughput per unfreeze depth, with and without the frozen-activation cache, and a
projected Stanford-Cars-sized study.

A synthetic dataset the size of Stanford Cars (16,185 images, 196 classes; 8,144 pool and
8,041 holdout as in the published split) lives as uint8 on the GPU. For each unfreeze depth it
times a training epoch over the training split (train_ratio 0.8) at 224 px in bf16 with
channels_last on the same 4 views of each image: once running the whole network, once from the
cache (all views built), plus the one-off cost of building those views. From the per-epoch times it projects
a 20-trial study of studies/stanford_cars.toml's space (depth uniform over 0..5, epochs
uniform over 5..30, no pruning: an upper bound). Every timed epoch is an epoch of
``TrialRunner.run_trial``, what a study runs (validation after each epoch is not in the time).
Finishes in a few minutes on one H200; needs torch, torchvision and numpy, plus what the
engine imports: pydantic, pandas and scikit-learn (it says so in one line when they are missing).

    python benchmarks/bench_gpu.py                 # on the GPU machine
    python benchmarks/bench_gpu.py --smoke         # a tiny CPU run that only checks the code path
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# The engine imports these at module level (config: pydantic; datasets.manifest: pandas;
# metrics: scikit-learn): one line saying how to get them beats a traceback on a torch-only machine.
_MISSING = " ".join(
    pip
    for module, pip in (("pydantic", "pydantic"), ("pandas", "pandas"), ("sklearn", "scikit-learn"))
    if find_spec(module) is None
)
if _MISSING:
    sys.exit(
        f"bench_gpu.py needs {_MISSING} besides torch, torchvision and numpy: pip install {_MISSING}; offline, run "
        f"`pip download {_MISSING} -d wheels` on a machine with the same Python and platform (it fetches their dependencies' "
        f"wheels too, pydantic-core among them), copy wheels/ here, then `pip install --no-index --find-links wheels {_MISSING}`"
    )

from transferstudy import runtime  # noqa: E402
from transferstudy.config import TrainSection  # noqa: E402
from transferstudy.images import DeviceData, ImageCache  # noqa: E402
from transferstudy.trial import TrialOutcome, TrialRunner  # noqa: E402

CARS = {"images": 16185, "pool": 8144, "classes": 196}


def synthetic_cache(n: int, classes: int, size: int, pool: int, seed: int = 0) -> ImageCache:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    splits = np.where(np.arange(n) < pool, "train", "test")
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageCache(
        images,
        labels.astype(np.int64),
        splits.astype("<U5"),
        [""] * n,
        [str(c) for c in range(classes)],
        [],
        "synthetic",
        size,
    )


def last_epoch(outcome: TrialOutcome) -> tuple[float, float]:
    """(seconds, images/s) of a trial's last training epoch (the first includes cuDNN autotuning)."""
    record = outcome.result.final
    return len(outcome.splits.train) / record.images_per_s, record.images_per_s


def build_all_views(runner: TrialRunner, s: TrainSection, device: torch.device):
    """The depth's feature cache with every view built: what the first epochs of a depth pay
    once (None when the cache does not fit)."""
    model = runner.build(s.unfreeze_depth).to(device, memory_format=runtime.memory_format(device))
    features = runner.feature_cache(model, s)
    if features is not None:
        for v in range(features.num_views):
            features.ensure_view(v, model, runner.data, device)
    return features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per setting; the last one counts")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device, to check the code path")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "bench_gpu.json"))
    a = p.parse_args()
    device = runtime.select_device("auto")
    runtime.configure(device)
    sizes = dict(CARS) if not a.smoke else {"images": 24, "pool": 16, "classes": 4}
    size = a.image_size if not a.smoke else 16
    print(
        f"{runtime.describe(device)}, torch {torch.__version__}; {sizes['images']} images, {sizes['classes']} classes, {size} px, batch {a.batch_size}"
    )

    t = time.perf_counter()
    cache = synthetic_cache(sizes["images"], sizes["classes"], size, sizes["pool"])
    data = DeviceData(cache, device, max_gpu_fraction=0.5)
    print(f"synthetic dataset on {data.images.device} in {time.perf_counter() - t:.1f} s")
    runner = TrialRunner(cache, "none", device, holdout_fraction=0.0, device_data=data)
    settings = TrainSection(
        weights="none",
        lr=1e-2,
        batch_size=a.batch_size,
        optimizer="sgd",
        augment=True,
        epochs=a.epochs,
        train_ratio=0.8,
        feature_views=a.views,
        feature_memory_fraction=0.6,
    )
    rows = []
    for depth in range(6):
        s = settings.with_params({"unfreeze_depth": depth})
        plain, plain_rate = last_epoch(runner.run_trial(s.with_params({"feature_memory_fraction": 0.0})))
        features = build_all_views(runner, s, device)
        build = features.build_seconds if features is not None else 0.0
        cached, cached_rate = last_epoch(runner.run_trial(s)) if features is not None else (plain, plain_rate)
        rows.append(
            {
                "depth": depth,
                "epoch_s": round(plain, 3),
                "images_per_s": round(plain_rate),
                "cached_epoch_s": round(cached, 3),
                "cached_images_per_s": round(cached_rate),
                "cache_build_s": round(build, 2) if features is not None else None,
                "cache_gb": round(features.nbytes / 1e9, 2) if features is not None else 0.0,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del features
        runtime.release_memory(device)

    mean_epochs = (5 + 30) / 2
    per_depth = {r["depth"]: r for r in rows}
    trials = [d % 6 for d in range(a.trials)]
    projected = sum(mean_epochs * per_depth[d]["cached_epoch_s"] * 1.25 for d in trials)  # +25% for validation passes
    projected += sum(r["cache_build_s"] or 0 for r in rows)
    naive = sum(mean_epochs * per_depth[d]["epoch_s"] * 1.25 for d in trials)
    print(
        "\n(view building: a depth's pass also fills the views of every deeper depth whose cache fits,"
        " so those show little or no build time of their own)"
    )
    print("\n| depth | img/s (whole network) | img/s (cached) | view build s | cache GB |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['depth']} | {r['images_per_s']} | {r['cached_images_per_s']} | {r['cache_build_s']} | {r['cache_gb']} |"
        )
    print(
        f"\nprojected {a.trials}-trial study (mean {mean_epochs} epochs, no pruning): {projected / 60:.1f} min with the cache, {naive / 60:.1f} min without"
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(
        json.dumps(
            {"args": vars(a), "device": runtime.describe(device), "rows": rows, "projected_min": projected / 60},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
