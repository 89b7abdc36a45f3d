"""The notebook approach, timed: ImageFolder + PIL transforms decoded every epoch, whole backbone
run forward every step.

This is what the original write-up did (and what most tutorials do): a torchvision
``ImageFolder`` with PIL transforms in a ``DataLoader``, a ResNet-50 whose frozen layers have
``requires_grad = False`` but still run forward on every batch of every epoch, fp32. With
``--standard`` it adds what a careful user would write on a GPU (timm/Lightning style): bf16
autocast and channels_last, still with the DataLoader decoding JPEGs every epoch.

    python benchmarks/naive_baseline.py --data benchmarks/out/data --depth 2 --epochs 3

Only torch, torchvision, numpy and Pillow are needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.models import resnet50

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def build(num_classes: int, depth: int, seed: int) -> nn.Module:
    """ResNet-50 with a new head; the bottom ``5 - depth`` stages get requires_grad = False."""
    torch.manual_seed(seed)
    model = resnet50(weights=None)
    model.fc = nn.Linear(2048, num_classes)
    groups = {
        "stem": [model.conv1, model.bn1],
        "layer1": [model.layer1],
        "layer2": [model.layer2],
        "layer3": [model.layer3],
        "layer4": [model.layer4],
    }
    for name in STAGES[: 5 - depth]:
        for module in groups[name]:
            module.requires_grad_(False)
    return model


def loaders(root: str, image_size: int, batch_size: int, workers: int) -> tuple[DataLoader, DataLoader]:
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    val_tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    kw = {
        "batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": workers > 0,
    }
    return (
        DataLoader(datasets.ImageFolder(f"{root}/train", train_tf), shuffle=True, drop_last=True, **kw),
        DataLoader(datasets.ImageFolder(f"{root}/test", val_tf), shuffle=False, **kw),
    )


def run_trial(
    root: str,
    depth: int,
    epochs: int,
    lr: float,
    batch_size: int,
    image_size: int,
    device: torch.device,
    workers: int = 2,
    standard: bool = False,
    seed: int = 0,
    loaders_pair=None,
) -> dict:
    """Train one trial the notebook way; returns seconds (the whole trial, validation included),
    training images/s and the final validation accuracy."""
    train_dl, val_dl = loaders_pair or loaders(root, image_size, batch_size, workers)
    model = build(len(train_dl.dataset.classes), depth, seed).to(device)
    fmt = torch.channels_last if standard and device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if standard and device.type == "cuda" else contextlib.nullcontext()
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    started, seen, acc, train_s = time.perf_counter(), 0, 0.0, 0.0
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_dl:
            x, y = x.to(device, non_blocking=True).to(memory_format=fmt), y.to(device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        sync()
        train_s += time.perf_counter() - t0
        model.eval()
        hits = total = 0
        with torch.no_grad(), autocast:
            for x, y in val_dl:
                pred = model(x.to(device).to(memory_format=fmt)).argmax(1).cpu()
                hits, total = hits + int((pred == y).sum()), total + len(y)
        acc = hits / max(total, 1)
    sync()
    seconds = time.perf_counter() - started
    # images/s counts training time only (as transferstudy's fit does); seconds is the whole trial
    return {
        "depth": depth,
        "epochs": epochs,
        "seconds": seconds,
        "train_images": seen,
        "images_per_s": seen / max(train_s, 1e-9),
        "val_acc": acc,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", required=True, help="folder with train/<class>/ and test/<class>/ (test = validation here)"
    )
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--standard", action="store_true", help="add bf16 autocast + channels_last (CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    print(
        json.dumps(
            run_trial(
                a.data,
                a.depth,
                a.epochs,
                a.lr,
                a.batch_size,
                a.image_size,
                torch.device(a.device),
                a.workers,
                a.standard,
            )
        )
    )


if __name__ == "__main__":
    main()
