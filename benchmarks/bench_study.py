"""The reference study, timed for transferstudy and for the notebook approach in one run.

Twelve trials (unfreeze depth : epochs) 0:3 0:3 1:3 1:3 2:3 2:3 3:3 3:3 4:3 4:3 5:3 5:3, same
learning rate, batch size and image size for both, on a generated JPEG dataset of fixed size.
Prints total seconds and their ratio, per-depth images/s, warm per-trial speed-ups, the
one-off cost of the caches (decoding, frozen activations) separately, and the compute floor
(the trainable stages' training step alone) that bounds what any cache can give. Figures go to
benchmarks/RESULTS.md by hand, with the command and the machine.

    python benchmarks/bench_study.py                         # CPU here: 400 JPEGs of 375x500, trained at 64 px
    python benchmarks/bench_study.py --repeats 3             # the figures in RESULTS.md (medians of three runs)
    python benchmarks/bench_study.py --floor-only            # the trainable stages' step alone, per depth
    python benchmarks/bench_study.py --depths 0 5            # only these depths (trials and floor)
    python benchmarks/bench_study.py --device cuda --image-size 224 --classes 50 --per-class 40 --standard

Needs torch, torchvision, numpy and Pillow, plus what the engine imports (pydantic, pandas, scikit-learn)
from this repository's src/, which the script puts on the path.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from transferstudy.config import TrainSection  # noqa: E402
from transferstudy.datasets import scan_folders  # noqa: E402
from transferstudy.images import load_cache  # noqa: E402
from transferstudy.model import MAX_DEPTH, build_model  # noqa: E402
from transferstudy.train import build_optimizer  # noqa: E402
from transferstudy.trial import TrialRunner  # noqa: E402

DEPTHS = tuple(range(MAX_DEPTH + 1))


def reference(epochs: int = 3, per_depth: int = 2, depths: tuple[int, ...] = DEPTHS) -> list[tuple[int, int]]:
    """The reference study: ``per_depth`` trials of each depth, ``epochs`` each (RESULTS.md: every
    depth, 2 x 3)."""
    return [(d, epochs) for d in depths for _ in range(per_depth)]


def make_dataset(root: Path, classes: int, per_class: int, val_per_class: int, source_px: int, seed: int = 0) -> Path:
    """Class-coloured shapes on noise, saved as JPEG (decoding cost like real photos).

    Each class has one colour in both train/ and test/, so validation accuracy is meaningful.
    """
    marker = root / "DONE.json"
    spec = {
        "classes": classes,
        "per_class": per_class,
        "val_per_class": val_per_class,
        "source_px": source_px,
        "seed": seed,
        "version": 2,
    }
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    h, w = source_px, int(source_px * 4 / 3)
    colours = rng.integers(0, 256, (classes, 3))
    for split, n in (("train", per_class), ("test", val_per_class)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
                img[y0 : y0 + h // 2, x0 : x0 + w // 2] = np.clip(colour + rng.integers(-25, 25, 3), 0, 255)
                Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)
    marker.write_text(json.dumps(spec))
    return root


class Project:
    """The twelve trials through transferstudy, each one ``TrialRunner.run_trial`` as in a study:
    decode once, frozen activations reused across trials.

    The generated images are all one pool (no holdout) and ``train_ratio`` cuts it, per class,
    into as many training and validation images as the baseline's train/ and test/ folders
    hold, so both contenders train on the same number of images of the same classes.
    """

    name = "transferstudy"

    def __init__(self, root: Path, args, device: torch.device) -> None:
        shutil.rmtree(root.parent / "cache", ignore_errors=True)  # the one-off decode is part of every run
        t0 = time.perf_counter()
        cache = load_cache(scan_folders(root), args.image_size, root.parent / "cache", show_progress=False)
        self.one_off_s = time.perf_counter() - t0  # view builds happen inside trials and are in their seconds
        # --views 0 keeps the default views and runs the frozen stages every step (no cache).
        views = (
            {"feature_views": args.views, "feature_memory_fraction": 0.6}
            if args.views
            else {"feature_memory_fraction": 0.0}
        )
        self.settings = TrainSection(
            weights="none",
            lr=args.lr,
            batch_size=args.batch_size,
            backbone_lr_mult=1.0,
            weight_decay=1e-4,
            augment=True,
            train_ratio=args.per_class / (args.per_class + args.val_per_class),
            **views,
        )
        pool = dataclasses.replace(cache, splits=np.full(len(cache), "pool"))
        self.runner = TrialRunner(pool, self.settings.weights, device, holdout_fraction=0.0)
        self.cache_build_s: dict[int, float] = {}

    def trial(self, depth: int, epochs: int) -> dict:
        outcome = self.runner.run_trial(self.settings.with_params({"unfreeze_depth": depth, "epochs": epochs}))
        result = outcome.result
        if outcome.features is not None:  # views are built inside the first trials' epochs (included in their seconds)
            self.cache_build_s[depth] = outcome.features.build_seconds
        return {
            "depth": depth,
            "epochs": epochs,
            "seconds": result.train_seconds,
            "images_per_s": result.images_per_s,
            "val_acc": result.final.val_acc,
        }


class Baseline:
    """The same trials through ``naive_baseline`` (the notebook approach, or standard practice)."""

    def __init__(self, root: Path, args, device: torch.device, standard: bool) -> None:
        self.name = "standard practice" if standard else "naive (notebook)"
        self.root, self.args, self.device, self.standard = root, args, device, standard
        self.loaders = naive_baseline.loaders(str(root), args.image_size, args.batch_size, args.workers)
        self.one_off_s = 0.0

    def trial(self, depth: int, epochs: int) -> dict:
        a = self.args
        return naive_baseline.run_trial(
            str(self.root),
            depth,
            epochs,
            a.lr,
            a.batch_size,
            a.image_size,
            self.device,
            a.workers,
            self.standard,
            loaders_pair=self.loaders,
        )


def compute_floor(
    args, device: torch.device, num_classes: int, steps: int = 8, cpu_bf16: bool = False
) -> dict[int, float]:
    """Images/s of the trainable stages' training step alone, per depth: forward, backward and
    optimiser step on a batch whose frozen activations are already computed — no data handling,
    no frozen forward. No cache can make a warm trial train faster than this, so
    ``floor / naive`` img/s bounds the warm speed-up any activation cache can reach here.
    ``cpu_bf16`` times the same step under bf16 autocast on the CPU (which transferstudy does
    not use there), to show what that precision would change."""
    settings = TrainSection(lr=args.lr, batch_size=args.batch_size, backbone_lr_mult=1.0, weight_decay=1e-4)
    floors = {}
    for depth in [d for d in args.depths if d > 0]:  # depth 0 trains the head alone: no stage to time
        runtime.seed_everything(0)
        model, _ = build_model(num_classes, "none", depth)
        model.to(device, memory_format=runtime.memory_format(device)).train()
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, num_classes, (args.batch_size,), device=device)
        with torch.no_grad():
            h = model.frozen_features(x.contiguous(memory_format=runtime.memory_format(device)))
        optimizer = build_optimizer(model, settings, device)
        for i in range(steps + 2):  # two warm-up steps
            if i == 2:
                runtime.synchronize(device)
                t0 = time.perf_counter()
            precision = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else runtime.autocast(device)
            with precision:
                loss = torch.nn.functional.cross_entropy(model.trainable_forward(h).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        runtime.synchronize(device)
        floors[depth] = steps * args.batch_size / (time.perf_counter() - t0)
        del model, optimizer
        runtime.release_memory(device)
    return floors


def run_once(root: Path, args, device: torch.device) -> tuple[list[dict], dict]:
    """One run of the reference study for every contender, their trials interleaved.

    Trial i of each contender runs back to back (the first to go alternating), so a machine
    that slows down or speeds up during the run affects every contender alike.
    """
    contenders = [Project(root, args, device), Baseline(root, args, device, standard=False)]
    if args.standard:
        contenders.append(Baseline(root, args, device, standard=True))
    trials: dict[str, list[dict]] = {c.name: [] for c in contenders}
    for i, (depth, epochs) in enumerate(reference(args.epochs, args.per_depth, args.depths)):
        for c in contenders[i % len(contenders) :] + contenders[: i % len(contenders)]:
            trials[c.name].append(c.trial(depth, epochs))
    project = contenders[0]
    one_off = {"decode_s": project.one_off_s, "cache_build_s": project.cache_build_s}
    return [summarize(c.name, trials[c.name], c.one_off_s) for c in contenders], one_off


def summarize(name: str, trials: list[dict], one_off: float = 0.0) -> dict:
    per_depth: dict[int, list[dict]] = {}
    for t in trials:
        per_depth.setdefault(t["depth"], []).append(t)
    return {
        "name": name,
        "trials": trials,
        "total_s": sum(t["seconds"] for t in trials) + one_off,
        "warm_trial_s": {d: ts[-1]["seconds"] for d, ts in per_depth.items()},
        "images_per_s": {d: round(float(np.mean([t["images_per_s"] for t in ts])), 1) for d, ts in per_depth.items()},
        "val_acc": {d: round(float(np.mean([t["val_acc"] for t in ts])), 3) for d, ts in per_depth.items()},
    }


def speedups(ours: dict, other: dict) -> dict:
    return {
        "total": other["total_s"] / ours["total_s"],
        "warm": {d: other["warm_trial_s"][d] / ours["warm_trial_s"][d] for d in ours["warm_trial_s"]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument(
        "--source-px",
        type=int,
        default=375,
        help="height of the generated JPEGs (photo-sized by default, as in Stanford Cars)",
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=3, help="epochs of each reference trial (RESULTS.md: 3)")
    p.add_argument("--per-depth", type=int, default=2, help="reference trials per depth (RESULTS.md: 2)")
    p.add_argument(
        "--depths",
        type=int,
        nargs="+",
        choices=DEPTHS,
        default=list(DEPTHS),
        help="unfreeze depths of the reference trials and the compute floor (RESULTS.md: all)",
    )
    p.add_argument("--floor-steps", type=int, default=8, help="timed steps of the compute floor, per depth")
    p.add_argument(
        "--views",
        type=int,
        default=4,
        help="training views per image, cached (0 = no cache: the default views, frozen stages run every step)",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baselines")
    p.add_argument(
        "--standard", action="store_true", help="also time the standard-practice baseline (bf16 + channels_last)"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="run the whole comparison this many times; medians are printed too"
    )
    p.add_argument(
        "--floor-only",
        action="store_true",
        help="only time the trainable stages' step alone (fp32, and bf16 on the CPU)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    runtime.configure(device)
    root = make_dataset(Path(args.out) / "data", args.classes, args.per_class, args.val_per_class, args.source_px)
    print(
        f"machine: {platform.processor() or platform.machine()}, {runtime.describe(device)}, torch {torch.__version__}"
    )
    print(
        f"dataset: {args.classes} classes x {args.per_class} train + {args.val_per_class} val JPEGs, {args.image_size} px, batch {args.batch_size}"
    )

    if args.floor_only:
        fp32 = compute_floor(args, device, args.classes, args.floor_steps)
        bf16 = (
            compute_floor(args, device, args.classes, args.floor_steps, cpu_bf16=True) if device.type == "cpu" else {}
        )
        print("\n| depth | step alone img/s | with bf16 autocast on the CPU |\n|---|---|---|")
        for d, v in fp32.items():
            print(f"| {d} | {v:,.1f} | " + (f"{bf16[d]:,.1f} ({bf16[d] / v:.2f}x)" if bf16 else "-") + " |")
        return
    runs = []
    for r in range(args.repeats):
        results, one_off = run_once(root, args, device)
        runs.append({"results": results, "one_off": one_off})
        ours = results[0]
        print(f"\n## run {r + 1} of {args.repeats}")
        print(
            f"one-off: decode {one_off['decode_s']:.1f} s; building cached views (inside the trials' times): "
            + ", ".join(f"depth {d}: {s:.1f} s" for d, s in one_off["cache_build_s"].items())
        )
        print("\n| run | total s (incl. one-off) | " + " | ".join(f"depth {d} img/s" for d in args.depths) + " |")
        print("|---|---|" + "---|" * len(args.depths))
        for res in results:
            print(
                f"| {res['name']} | {res['total_s']:.1f} | "
                + " | ".join(f"{res['images_per_s'][d]:,.1f}" for d in args.depths)
                + " |"
            )
        for res in results[1:]:
            x = speedups(ours, res)
            print(
                f"\ntransferstudy vs {res['name']}: {x['total']:.2f}x faster in total; warm per-trial speed-up by depth: "
                + ", ".join(f"{d}: {v:.1f}x" for d, v in x["warm"].items())
            )
        print("\nmean validation accuracy by depth: " + "; ".join(f"{res['name']} {res['val_acc']}" for res in results))
    floors = compute_floor(args, device, args.classes, args.floor_steps)
    naive = runs[-1]["results"][1]["images_per_s"]
    print("\n## compute floor: the trainable stages' training step alone (no data, no frozen forward)")
    print("| depth | step alone img/s | naive img/s (last run) | most any cache can give |")
    print("|---|---|---|---|")
    for d, v in floors.items():
        print(f"| {d} | {v:,.1f} | {naive[d]:,.1f} | {v / naive[d]:.1f}x |")
    if args.repeats > 1:
        print(f"\n## median over {args.repeats} runs")
        for k, name in enumerate(res["name"] for res in runs[0]["results"][1:]):
            xs = [speedups(run["results"][0], run["results"][k + 1]) for run in runs]
            totals = ", ".join(f"{x['total']:.2f}" for x in xs)
            print(
                f"transferstudy vs {name}: total {np.median([x['total'] for x in xs]):.2f}x (runs: {totals}); warm per-trial by depth: "
                + ", ".join(f"{d}: {np.median([x['warm'][d] for x in xs]):.1f}x" for d in args.depths)
            )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_study.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "compute_floor": floors}, indent=1)
    )


if __name__ == "__main__":
    main()
