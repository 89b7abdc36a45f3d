"""Top-5 predictions of a trained model for image files or folders.

    python -m transferstudy.predict studies/demo/best.pt photo.jpg more_photos/
    python -m transferstudy.predict studies/demo/model/ photos/ --format csv --out predictions.csv

The model is a checkpoint written by a study (``.pt``) or an exported model folder (model.json
beside model.onnx and model.pt2, see export.py), run with ONNX Runtime when it is installed and
with PyTorch otherwise. Images are decoded and predicted one batch at a time. An unreadable
image is reported on stderr, gets a row with its ``error`` in csv/json output, and is skipped;
the exit status is then 1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from . import runtime
from .export import META_FILE, RUNTIMES, ExportUnavailableError, load_exported, to_input
from .images.decode import ImageProblem, decode_image
from .model import load_checkpoint
from .progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
FORMATS = ("text", "csv", "json")


def expand(paths: list[str | Path]) -> list[Path]:
    """Files as given, plus the image files below each folder (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def load_model(path: str | Path, device: torch.device, runtime_name: str = "auto") -> tuple[Callable, dict]:
    """A checkpoint file or an exported model folder (or its model.json) -> (model, metadata).

    The model maps normalised images to logits; the metadata has ``class_names`` and
    ``preprocessing`` either way. ``runtime_name`` (one of ``export.RUNTIMES``) applies to folders.
    """
    path = Path(path)
    if path.name == META_FILE:
        path = path.parent
    if path.is_dir():
        return load_exported(path, runtime_name, device)
    return load_checkpoint(path, device)


@torch.no_grad()
def iter_predictions(
    model: Callable,
    meta: dict,
    paths: list[Path],
    device: torch.device,
    k: int = 5,
    batch_size: int = 64,
    show_progress: bool = False,
) -> Iterator[dict]:
    """For each file, in order: ``{"path", "top": [(class, probability), ...]}`` or ``{"path", "error"}``.

    Only one batch of images is in memory at a time, so folders of any size work.

    Args:
        model: from ``load_model``, or any callable from normalised images to logits that is
            ready to run (eval mode, on ``device``).
        meta: ``class_names`` and ``preprocessing`` (``image_size``, ``resize_mode``, ``mean``, ``std``).
    """
    pre, names = meta["preprocessing"], meta["class_names"]
    bar = progress(len(paths), "predict", "img", enabled=show_progress)
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            results, arrays = [], []
            for p in chunk:
                try:
                    arrays.append(decode_image(p, pre["image_size"], pre["resize_mode"]))
                    results.append({"path": str(p)})
                except ImageProblem as exc:
                    results.append({"path": str(p), "error": str(exc)})
            if arrays:
                x = to_input(torch.from_numpy(np.stack(arrays)).to(device), pre)
                probs = torch.softmax(model(x).float(), 1).cpu().numpy()
                for r, pr in zip((r for r in results if "error" not in r), probs):
                    top = np.argsort(-pr, kind="stable")[:k]
                    r["top"] = [(names[c], float(pr[c])) for c in top]
            yield from results
            bar.update(len(chunk))
    finally:
        bar.close()


def predict(
    model: Callable, meta: dict, paths: list[Path], device: torch.device, k: int = 5, batch_size: int = 64
) -> list[dict]:
    """``iter_predictions`` as a list."""
    return list(iter_predictions(model, meta, paths, device, k, batch_size))


def write_text(results: Iterable[dict], out: TextIO, k: int) -> None:
    """The path, then one ``probability  class`` line per class; files with an error are left out."""
    for r in results:
        if "top" in r:
            out.write(r["path"] + "\n" + "".join(f"  {p:7.2%}  {name}\n" for name, p in r["top"]))


def write_csv(results: Iterable[dict], out: TextIO, k: int) -> None:
    """One row per file: path, class_1, probability_1 ... class_k, probability_k, error."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", *(f"{col}_{i}" for i in range(1, k + 1) for col in ("class", "probability")), "error"])
    for r in results:
        cells = [cell for name, p in r.get("top", []) for cell in (name, f"{p:.6g}")]
        writer.writerow([r["path"], *cells, *[""] * (2 * k - len(cells)), r.get("error", "")])


def write_json(results: Iterable[dict], out: TextIO, k: int) -> None:
    """``{"predictions": [{"path", "top": [{"class", "probability"}], "error"}], "images", "skipped"}``.

    Written as it goes (one line per file), so memory does not grow with the folder.
    """
    out.write('{"predictions": [')
    count = skipped = 0
    for r in results:
        top = [{"class": name, "probability": p} for name, p in r.get("top", [])]
        row = {"path": r["path"], "top": top, "error": r.get("error")}
        out.write(("," if count else "") + "\n  " + json.dumps(row))
        count, skipped = count + 1, skipped + ("error" in r)
    out.write(f'\n], "images": {count}, "skipped": {skipped}}}\n')


WRITERS = {"text": write_text, "csv": write_csv, "json": write_json}


def _report_errors(results: Iterable[dict], failed: list[str]) -> Iterator[dict]:
    """Pass results through; an unreadable file goes to stderr as soon as it is met."""
    for r in results:
        if "error" in r:
            failed.append(r["path"])
            print(f"{r['path']}: skipped: {r['error']}", file=sys.stderr)
        yield r


@contextlib.contextmanager
def _progress_lines_to_stderr() -> Iterator[None]:
    """Where stderr is no terminal (so no bar), progress is logged: show those lines while main runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("transferstudy")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transferstudy.predict", description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument(
        "model", help="a .pt checkpoint (studies/<name>/best.pt) or an exported model folder (with model.json)"
    )
    parser.add_argument("paths", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("-k", type=int, default=5, help="how many classes to show per image (default: 5)")
    parser.add_argument(
        "--format", choices=FORMATS, default="text", help="text (default), csv or json: one row per image"
    )
    parser.add_argument("--out", type=Path, help="write the predictions to this file (default: stdout)")
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="for a model folder: onnx, torch or auto (default: onnx when installed)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images decoded and predicted at a time (default: 64)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        device = runtime.select_device(args.device)
        model, meta = load_model(args.model, device, args.runtime)
    except (FileNotFoundError, ValueError, ExportUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k = min(args.k, len(meta["class_names"]))
    failed: list[str] = []
    with (
        _progress_lines_to_stderr(),
        open(args.out, "w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as out,
    ):
        results = iter_predictions(model, meta, expand(args.paths), device, k, args.batch_size, show_progress=True)
        WRITERS[args.format](_report_errors(results, failed), out, k)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
