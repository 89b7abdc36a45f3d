"""GPU throughput per unfreeze depth, with and without the frozen-activation cache, and a
projected Stanford-Cars-sized study.

A synthetic dataset the size of Stanford Cars (16,185 images, 196 classes; 8,144 pool and
8,041 holdout as in the published split) lives as uint8 on the GPU. For each unfreeze depth it
times a training epoch over the training split (train_ratio 0.8) at 224 px in bf16 with
channels_last: once running the whole network on augmented images, once from the cache
(4 views, all built), plus the one-off cost of building those views. From the per-epoch times it projects
a 20-trial study of studies/stanford_cars.toml's space (depth uniform over 0..5, epochs
uniform over 5..30, no pruning: an upper bound). Finishes in a few minutes on one H200; needs
only torch, torchvision and numpy.

    python benchmarks/bench_gpu.py                 # on the GPU machine
    python benchmarks/bench_gpu.py --smoke         # a tiny CPU run that only checks the code path
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transferstudy import runtime  # noqa: E402
from transferstudy.config import TrainSection  # noqa: E402
from transferstudy.features import FeatureStore  # noqa: E402
from transferstudy.images import DeviceData, ImageCache  # noqa: E402
from transferstudy.model import build_model  # noqa: E402
from transferstudy.train import build_optimizer, build_scheduler, train_one_epoch  # noqa: E402

CARS = {"images": 16185, "pool": 8144, "classes": 196}


def synthetic_cache(n: int, classes: int, size: int, pool: int, seed: int = 0) -> ImageCache:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    splits = np.where(np.arange(n) < pool, "train", "test")
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageCache(images, labels.astype(np.int64), splits.astype("<U5"), [""] * n, [str(c) for c in range(classes)], [], "synthetic", size)


def time_epochs(model, data, train_idx, settings, device, features, epochs: int) -> list[float]:
    """Seconds of each training epoch (the first includes cuDNN autotuning)."""
    optimizer = build_optimizer(model, settings, device)
    steps = len(train_idx) // settings.batch_size
    scheduler = build_scheduler(optimizer, steps, settings)
    order = runtime.generator(0, torch.device("cpu"))
    aug = runtime.generator(1, device)
    times = []
    for epoch in range(1, epochs + 1):
        runtime.synchronize(device)
        t = time.perf_counter()
        train_one_epoch(model, data, train_idx, optimizer, scheduler, settings, device, order, aug, features, epoch)
        runtime.synchronize(device)
        times.append(time.perf_counter() - t)
    return times


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
    sizes = dict(CARS) if not a.smoke else {"images": 60, "pool": 40, "classes": 4}
    size = a.image_size if not a.smoke else 32
    print(f"{runtime.describe(device)}, torch {torch.__version__}; {sizes['images']} images, {sizes['classes']} classes, {size} px, batch {a.batch_size}")

    t = time.perf_counter()
    cache = synthetic_cache(sizes["images"], sizes["classes"], size, sizes["pool"])
    data = DeviceData(cache, device, max_gpu_fraction=0.5)
    print(f"synthetic dataset on {data.images.device} in {time.perf_counter() - t:.1f} s")
    pool = np.arange(sizes["pool"])
    train_idx = pool[: int(0.8 * len(pool))]
    settings = TrainSection(lr=1e-2, batch_size=a.batch_size, optimizer="sgd", augment=True)
    store = FeatureStore("bench-gpu", a.views, settings.augment, 0, memory_fraction=0.6)
    rows = []
    for depth in range(6):
        runtime.seed_everything(0)
        model, _ = build_model(sizes["classes"], "none", depth)
        model.to(device, memory_format=runtime.memory_format(device))
        plain = time_epochs(model, data, train_idx, settings, device, None, a.epochs)[-1]
        features = store.get(model, data, pool, device)
        if features is not None:
            for v in range(features.num_views):  # what the first epochs of a depth pay once
                features.ensure_view(v, model, data, device)
        build = features.build_seconds if features is not None else 0.0
        cached = time_epochs(model, data, train_idx, settings, device, features, a.epochs)[-1] if features is not None else plain
        rows.append({
            "depth": depth, "epoch_s": round(plain, 3), "images_per_s": round(len(train_idx) / plain),
            "cached_epoch_s": round(cached, 3), "cached_images_per_s": round(len(train_idx) / cached),
            "cache_build_s": round(build, 2) if features is not None else None,
            "cache_gb": round(features.nbytes / 1e9, 2) if features is not None else 0.0,
        })
        print(json.dumps(rows[-1]), flush=True)
        del model, features
        runtime.release_memory(device)

    mean_epochs = (5 + 30) / 2
    per_depth = {r["depth"]: r for r in rows}
    trials = [d % 6 for d in range(a.trials)]
    projected = sum(mean_epochs * per_depth[d]["cached_epoch_s"] * 1.25 for d in trials)  # +25% for validation passes
    projected += sum(r["cache_build_s"] or 0 for r in rows)
    naive = sum(mean_epochs * per_depth[d]["epoch_s"] * 1.25 for d in trials)
    print("\n(view building: a depth's pass also fills the views of every deeper depth whose cache fits,"
          " so those show little or no build time of their own)")
    print("\n| depth | img/s (whole network) | img/s (cached) | view build s | cache GB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']} | {r['images_per_s']} | {r['cached_images_per_s']} | {r['cache_build_s']} | {r['cache_gb']} |")
    print(f"\nprojected {a.trials}-trial study (mean {mean_epochs} epochs, no pruning): {projected / 60:.1f} min with the cache, {naive / 60:.1f} min without")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "device": runtime.describe(device), "rows": rows, "projected_min": projected / 60}, indent=1))


if __name__ == "__main__":
    main()
