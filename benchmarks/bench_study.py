"""The reference study, timed for transferstudy and for the notebook approach in one run.

Twelve trials (unfreeze depth : epochs) 0:3 0:3 1:3 1:3 2:3 2:3 3:3 3:3 4:3 4:3 5:3 5:3, same
learning rate, batch size and image size for both, on a generated JPEG dataset of fixed size.
Prints total seconds and their ratio, per-depth images/s, warm per-trial speed-ups, and the
one-off cost of the caches (decoding, frozen activations) separately. Figures go to
benchmarks/RESULTS.md by hand, with the command and the machine.

    python benchmarks/bench_study.py                         # CPU here: 400 JPEGs of 375x500, trained at 64 px
    python benchmarks/bench_study.py --device cuda --image-size 224 --classes 50 --per-class 40 --standard

Only torch, torchvision, numpy and Pillow are needed (plus this repository's src/ on the path).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import naive_baseline  # noqa: E402
from transferstudy import runtime  # noqa: E402
from transferstudy.data import Augment, DeviceData, load_cache  # noqa: E402
from transferstudy.datasets import scan_folders  # noqa: E402
from transferstudy.features import FeatureStore  # noqa: E402
from transferstudy.model import build_model  # noqa: E402
from transferstudy.train import TrainSettings, fit  # noqa: E402

REFERENCE = [(d, 3) for d in range(6) for _ in range(2)]


def make_dataset(root: Path, classes: int, per_class: int, val_per_class: int, source_px: int, seed: int = 0) -> Path:
    """Class-coloured shapes on noise, saved as JPEG (decoding cost like real photos)."""
    marker = root / "DONE.json"
    spec = {"classes": classes, "per_class": per_class, "val_per_class": val_per_class, "source_px": source_px, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    h, w = source_px, int(source_px * 4 / 3)
    for split, n in (("train", per_class), ("test", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(0, 256, 3)
            for i in range(n):
                img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                img[y0 : y0 + h // 2, x0 : x0 + w // 2] = np.clip(colour + rng.integers(-25, 25, 3), 0, 255)
                Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)
    marker.write_text(json.dumps(spec))
    return root


def run_project(root: Path, args, device: torch.device) -> dict:
    """The twelve trials through transferstudy: decode once, frozen activations reused."""
    shutil.rmtree(root.parent / "cache", ignore_errors=True)  # the one-off decode is part of every run
    t0 = time.perf_counter()
    cache = load_cache(scan_folders(root), args.image_size, root.parent / "cache", show_progress=False)
    decode_s = time.perf_counter() - t0
    data = DeviceData(cache, device)
    train_idx, val_idx = np.flatnonzero(cache.splits == "train"), np.flatnonzero(cache.splits == "test")
    rows = np.sort(np.concatenate([train_idx, val_idx]))
    settings = TrainSettings(lr=args.lr, batch_size=args.batch_size, backbone_lr_mult=1.0, weight_decay=1e-4, augment=Augment())
    store = FeatureStore("bench", args.views, settings.augment, 0, 0.6) if args.views else None
    trials, cache_build = [], {}
    for depth, epochs in REFERENCE:
        runtime.seed_everything(0)
        model, _ = build_model(cache.num_classes, "none", depth)
        features = store.get(model, data, rows, device) if store else None
        s = TrainSettings(**{**vars(settings), "epochs": epochs})
        result = fit(model, data, train_idx, val_idx, s, device, features=features)
        trials.append({"depth": depth, "epochs": epochs, "seconds": result.train_seconds, "images_per_s": result.images_per_s, "val_acc": result.final.val_acc})
        if features is not None:  # views are built inside the first trials' epochs (included in their seconds)
            cache_build[depth] = features.build_seconds
        del model
        runtime.release_memory(device)
    return {"decode_s": decode_s, "cache_build_s": cache_build, "trials": trials}


def run_baseline(root: Path, args, device: torch.device, standard: bool) -> dict:
    pair = naive_baseline.loaders(str(root), args.image_size, args.batch_size, args.workers)
    trials = [
        naive_baseline.run_trial(str(root), d, e, args.lr, args.batch_size, args.image_size, device, args.workers, standard, loaders_pair=pair)
        for d, e in REFERENCE
    ]
    return {"trials": trials}


def summarize(name: str, run: dict, one_off: float = 0.0) -> dict:
    trials = run["trials"]
    per_depth = {}
    for t in trials:
        per_depth.setdefault(t["depth"], []).append(t)
    return {
        "name": name,
        "total_s": sum(t["seconds"] for t in trials) + one_off,
        "warm_trial_s": {d: ts[-1]["seconds"] for d, ts in per_depth.items()},
        "images_per_s": {d: round(np.mean([t["images_per_s"] for t in ts]), 1) for d, ts in per_depth.items()},
        "val_acc": {d: round(np.mean([t["val_acc"] for t in ts]), 3) for d, ts in per_depth.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--source-px", type=int, default=375, help="height of the generated JPEGs (photo-sized by default, as in Stanford Cars)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--views", type=int, default=4, help="frozen-activation cache views (0 = no cache)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baselines")
    p.add_argument("--standard", action="store_true", help="also time the standard-practice baseline (bf16 + channels_last)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    runtime.configure(device)
    root = make_dataset(Path(args.out) / "data", args.classes, args.per_class, args.val_per_class, args.source_px)
    print(f"machine: {platform.processor() or platform.machine()}, {runtime.describe(device)}, torch {torch.__version__}")
    print(f"dataset: {args.classes} classes x {args.per_class} train + {args.val_per_class} val JPEGs, {args.image_size} px, batch {args.batch_size}")

    project = run_project(root, args, device)
    one_off = project["decode_s"]  # view builds happen inside trials and are already in their seconds
    results = [summarize("transferstudy", project, one_off)]
    results.append(summarize("naive (notebook)", run_baseline(root, args, device, standard=False)))
    if args.standard:
        results.append(summarize("standard practice", run_baseline(root, args, device, standard=True)))

    ours = results[0]
    print(f"\none-off: decode {project['decode_s']:.1f} s; building cached views (inside the trials' times): "
          + ", ".join(f"depth {d}: {s:.1f} s" for d, s in project["cache_build_s"].items()))
    print("\n| run | total s (incl. one-off) | " + " | ".join(f"depth {d} img/s" for d in range(6)) + " |")
    print("|---|---|" + "---|" * 6)
    for r in results:
        print(f"| {r['name']} | {r['total_s']:.1f} | " + " | ".join(str(r["images_per_s"][d]) for d in range(6)) + " |")
    for r in results[1:]:
        print(f"\ntransferstudy vs {r['name']}: {r['total_s'] / ours['total_s']:.2f}x faster in total; warm per-trial speed-up by depth: "
              + ", ".join(f"{d}: {r['warm_trial_s'][d] / ours['warm_trial_s'][d]:.1f}x" for d in range(6)))
    print("\nmean validation accuracy by depth: " + "; ".join(f"{r['name']} {r['val_acc']}" for r in results))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_study.json").write_text(json.dumps({"args": vars(args), "project": project, "results": results}, indent=1))


if __name__ == "__main__":
    main()
