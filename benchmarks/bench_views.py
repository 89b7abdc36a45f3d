"""How many cached views per image: validation accuracy and cost for V = 1, 2, 4, 8 and no cache.

Every trial trains on V fixed views of each image (centre, mirror, then seeded random-resized
crops; epoch e on view (e - 1) mod V), so that the frozen-activation cache can hold them. More
views mean more variety for the trainable stages and V times the memory and the one-off build.
This trains the same trials with each V (cached), and with no cache at all: as many views as
epochs, so no view repeats, run through the whole network every step (the closest the
training regime comes to a fresh crop every epoch, the reference for accuracy). It prints mean
validation accuracy, seconds per trial (view builds included) and cache size per depth, on one
of two datasets:

* ``shapes`` (default): class-coloured shapes at random places on noise, as in bench_study.py;
  like photos of cars, flips and crops keep the class, so augmentation should help;
* ``digits``: the embedded handwritten digits, where a mirrored or cropped digit is a worse
  example, so augmentation should hurt.

    python benchmarks/bench_views.py                       # CPU: shapes, 32 px, depths 2 and 3, 6 epochs, 2 seeds
    python benchmarks/bench_views.py --dataset digits
    python benchmarks/bench_views.py --views 1 4 --seeds 1 # a quicker look

Random-init weights (nothing is downloaded): the frozen stages are random features, so the
figures speak for what the trainable stages make of the views, not for ImageNet features.
Needs what bench_study.py needs (scikit-learn also provides the digits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_study import make_dataset  # noqa: E402

from transferstudy import runtime  # noqa: E402
from transferstudy.config import TrainSection  # noqa: E402
from transferstudy.datasets import scan_folders  # noqa: E402
from transferstudy.datasets.demo import write_digits  # noqa: E402
from transferstudy.images import DeviceData, ImageCache, load_cache  # noqa: E402
from transferstudy.splits import make_splits  # noqa: E402
from transferstudy.trial import TrialRunner  # noqa: E402

#: The split of every trial: 80 % of the pool trains; no holdout drawn (a test/ folder still is one).
TRAIN_RATIO, HOLDOUT_FRACTION = 0.8, 0.0


def run_setting(views: int, args, cache: ImageCache, data: DeviceData, device: torch.device) -> list[dict]:
    """Every (depth, seed) trial with ``views`` cached views (0 = no cache, a view per epoch), each one
    ``TrialRunner.run_trial``; one runner (so one feature store) per seed, as in a study, so
    a depth's first trial pays for building its views."""
    if views:
        regime = {"feature_views": views, "feature_memory_fraction": 0.6}
    else:  # a view per epoch, so none repeats (64: the most feature_views allows)
        regime = {"feature_views": min(args.epochs, 64), "feature_memory_fraction": 0.0}
    out = []
    for seed in range(args.seeds):
        settings = TrainSection(
            weights="none",
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            backbone_lr_mult=1.0,
            train_seed=seed,
            augment=True,
            train_ratio=TRAIN_RATIO,
            **regime,
        )
        runner = TrialRunner(cache, settings.weights, device, HOLDOUT_FRACTION, device_data=data, init_seed=seed)
        for depth in args.depths:
            outcome = runner.run_trial(settings.with_params({"unfreeze_depth": depth}))
            result, features = outcome.result, outcome.features
            out.append(
                {
                    "views": views,
                    "depth": depth,
                    "seed": seed,
                    "seconds": result.train_seconds,
                    "val_acc": result.final.val_acc,
                    "best_val_acc": max(r.val_acc for r in result.history),
                    "cache_mb": features.nbytes / 1e6 if features is not None else 0.0,
                }
            )
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--dataset", choices=("shapes", "digits"), default="shapes")
    p.add_argument(
        "--views", type=int, nargs="+", default=[1, 2, 4, 8], help="V values to try (no cache is always run)"
    )
    p.add_argument("--depths", type=int, nargs="+", default=[2, 3])
    p.add_argument(
        "--per-class", type=int, default=60, help="shapes: training images per class (a third more validate)"
    )
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    runtime.configure(device)
    if args.dataset == "digits":
        root = write_digits(Path(args.out) / "digits")
    else:  # 60 + 20 per class by default; 96 px sources keep decoding quick, the shapes survive 32 px
        root = make_dataset(
            Path(args.out) / "shapes",
            classes=10,
            per_class=args.per_class,
            val_per_class=max(1, args.per_class // 3),
            source_px=96,
        )
    cache = load_cache(
        scan_folders(root), args.image_size, Path(args.out) / f"{args.dataset}-cache", show_progress=False
    )
    data = DeviceData(cache, device)
    splits = make_splits(cache, TRAIN_RATIO, HOLDOUT_FRACTION, split_seed=0)
    print(
        f"{runtime.describe(device)}, torch {torch.__version__}; {args.dataset} {splits.sizes()}, {args.image_size} px, "
        f"{args.epochs} epochs, depths {args.depths}, {args.seeds} seeds"
    )

    trials = []
    for views in [0, *args.views]:
        trials += run_setting(views, args, cache, data, device)

    print(
        "\n| views | "
        + " | ".join(f"depth {d} val acc" for d in args.depths)
        + " | s per trial | "
        + " | ".join(f"depth {d} cache MB" for d in args.depths)
        + " |"
    )
    print("|---|" + "---|" * (2 * len(args.depths) + 1))
    for views in [0, *args.views]:
        mine = [t for t in trials if t["views"] == views]
        acc = [np.mean([t["val_acc"] for t in mine if t["depth"] == d]) for d in args.depths]
        spread = [np.std([t["val_acc"] for t in mine if t["depth"] == d]) for d in args.depths]
        mb = [max(t["cache_mb"] for t in mine if t["depth"] == d) for d in args.depths]
        print(
            f"| {views or 'no cache'} | "
            + " | ".join(f"{a:.3f} ± {s:.3f}" for a, s in zip(acc, spread))
            + f" | {np.mean([t['seconds'] for t in mine]):.1f} | "
            + " | ".join(f"{m:.1f}" for m in mb)
            + " |"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_views.json").write_text(json.dumps({"args": vars(args), "trials": trials}, indent=1))


if __name__ == "__main__":
    main()
