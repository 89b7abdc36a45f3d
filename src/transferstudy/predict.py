"""Top-5 predictions of a trained checkpoint for image files or folders.

    python -m transferstudy.predict studies/demo/best.pt photo.jpg more_photos/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .images.batches import normalize
from .images.decode import ImageProblem, decode_image
from .model import load_checkpoint

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def expand(paths: list[str | Path]) -> list[Path]:
    """Files as given, plus the image files below each folder (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


@torch.no_grad()
def predict(model, meta: dict, paths: list[Path], device: torch.device, k: int = 5, batch_size: int = 64) -> list[dict]:
    """For each file: ``{"path", "top": [(class, probability), ...]}`` or ``{"path", "error"}``."""
    pre = meta["preprocessing"]
    names = meta["class_names"]
    results, arrays, rows = [], [], []
    for p in paths:
        try:
            arrays.append(decode_image(p, pre["image_size"], pre["resize_mode"]))
            rows.append(len(results))
            results.append({"path": str(p)})
        except ImageProblem as exc:
            results.append({"path": str(p), "error": str(exc)})
    model.eval().to(device)
    for start in range(0, len(arrays), batch_size):
        x = normalize(torch.from_numpy(np.stack(arrays[start : start + batch_size])).to(device))
        probs = torch.softmax(model(x).float(), 1).cpu().numpy()
        for row, pr in zip(rows[start : start + batch_size], probs):
            top = np.argsort(-pr, kind="stable")[:k]
            results[row]["top"] = [(names[c], float(pr[c])) for c in top]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transferstudy.predict", description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint", help="a .pt file written by a study (studies/<name>/best.pt)")
    parser.add_argument("paths", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("-k", type=int, default=5, help="how many classes to show per image (default: 5)")
    args = parser.parse_args(argv)
    try:
        device = runtime.select_device(args.device)
        model, meta = load_checkpoint(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for r in predict(model, meta, expand(args.paths), device, args.k):
        if "error" in r:
            failed += 1
            print(f"{r['path']}: skipped: {r['error']}", file=sys.stderr)
            continue
        print(r["path"])
        for name, p in r["top"]:
            print(f"  {p:7.2%}  {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
