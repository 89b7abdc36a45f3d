"""Image data: decode once, cache, split, and batch on the training device.

Every image is decoded a single time into a uint8 array at training resolution (one pass that
also validates the files), the arrays are stored on disk under a fingerprint of the files and
the resolution, and later runs memory-map them instead of decoding again. Training batches are
cut from the in-memory array and augmented on the training device, so no epoch touches a JPEG.

    >>> cache = load_cache(scan_folders("data/cars"), image_size=224, cache_dir="studies/cache")
    >>> splits = make_splits(cache, train_ratio=0.8, holdout_fraction=0.2, split_seed=0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .datasets.base import DatasetError, DatasetIndex, Problem
from .progress import progress

log = logging.getLogger(__name__)

#: ImageNet channel statistics used by every torchvision ResNet-50 checkpoint.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Largest image accepted, in pixels (about 16k x 11k); larger files are reported as
#: possible decompression bombs instead of being decoded.
MAX_IMAGE_PIXELS = 178_956_970
#: Bump when the on-disk cache layout or the decoding changes, so old caches are not reused.
CACHE_VERSION = 2
RESIZE_MODES = ("center_crop", "stretch")


class ImageProblem(Exception):
    """A file that cannot be used as an image; str() is the reason shown to the user."""


# --------------------------------------------------------------------------- decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, alpha and 16-bit images become 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "stretch":
        return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)


def decode_image(
    path: str | Path,
    size: int,
    resize_mode: str = "center_crop",
    bbox: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Decode one file into a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied, the optional bounding box is cropped, and the image is
    resized (``center_crop``: shorter side to ``size`` then centre crop; ``stretch``: both
    sides to ``size``).

    Raises:
        ImageProblem: the file is empty, not an image, truncated, corrupt or too large.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageProblem("empty file (0 bytes)")
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at reduced scale when large
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"image too large (possible decompression bomb): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageProblem("not an image (format not recognised)") from None
    except OSError as exc:
        raise ImageProblem(f"unreadable or truncated image: {exc}") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageProblem(f"corrupt image: {exc}") from None
    if bbox is not None:
        left, top, right, bottom = bbox
        box = (max(0, left), max(0, top), min(img.width, right), min(img.height, bottom))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ImageProblem(f"bounding box {bbox} lies outside the {img.width}x{img.height} image")
        img = img.crop(box)
    return np.asarray(_resize(img, size, resize_mode), dtype=np.uint8)


def _decode_job(job: tuple[int, str, int, str, tuple | None]) -> tuple[int, np.ndarray | None, str | None]:
    i, path, size, mode, bbox = job
    try:
        return i, decode_image(path, size, mode, bbox), None
    except ImageProblem as exc:
        return i, None, str(exc)
    except Exception as exc:  # a decoder bug on one file must not stop the whole pass
        return i, None, f"could not decode: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- cache


@dataclass
class ImageCache:
    """Decoded images of one dataset at one resolution, plus the files that were skipped.

    Attributes:
        images: ``(N, S, S, 3)`` uint8 RGB, in sample order (possibly memory-mapped).
        labels: ``(N,)`` int64 class indices.
        splits: ``(N,)`` split tags ("train", "test" or "pool").
        paths: file of each row.
        decoded: files decoded by the call that produced this object (0 = fully reused).
    """

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    paths: list[str]
    class_names: list[str]
    problems: list[Problem]
    fingerprint: str
    image_size: int
    resize_mode: str = "center_crop"
    decoded: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


def _file_key(path: Path, bbox) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{bbox}"


def _keys(index: DatasetIndex) -> tuple[list[str | None], list[Problem]]:
    keys: list[str | None] = []
    problems: list[Problem] = []
    for s in index.samples:
        try:
            keys.append(_file_key(s.path, s.bbox))
        except OSError as exc:
            keys.append(None)
            problems.append(Problem(str(s.path), f"cannot be read: {exc.strerror or exc}"))
    return keys, problems


def dataset_fingerprint(index: DatasetIndex, image_size: int, resize_mode: str = "center_crop") -> str:
    """Hash of every file's path, size and modification time, plus the decoding settings."""
    keys, _ = _keys(index)
    return _fingerprint(index, keys, image_size, resize_mode)


def _fingerprint(index: DatasetIndex, keys, image_size: int, resize_mode: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{image_size}|{resize_mode}|{index.class_names}".encode())
    for s, key in zip(index.samples, keys):
        h.update(f"{key}|{s.label}|{s.split}\n".encode())
    return h.hexdigest()[:20]


def _previous_rows(cache_dir: Path, image_size: int, resize_mode: str, root: Path):
    """The newest earlier cache of the same dataset and settings: (images, row by file key,
    failure reason by file key), so unchanged files are neither decoded nor retried."""
    candidates = []
    for meta_path in cache_dir.glob("*/meta.json"):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if (meta.get("version"), meta.get("image_size"), meta.get("resize_mode"), meta.get("root")) == (
            CACHE_VERSION, image_size, resize_mode, str(root)
        ):
            candidates.append((meta_path.stat().st_mtime, meta_path.parent, meta))
    if not candidates:
        return None, {}, {}
    _, folder, meta = max(candidates, key=lambda c: c[0])
    failed = {key: reason for _, key, reason in meta.get("failed", [])}
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None, {}, failed
    return images, {key: row for row, key in enumerate(meta["keys"])}, failed


def load_cache(
    index: DatasetIndex,
    image_size: int,
    cache_dir: str | Path,
    resize_mode: str = "center_crop",
    workers: int | None = None,
    show_progress: bool = True,
) -> ImageCache:
    """Decode every image once (or reuse an earlier decode) and validate the dataset.

    Files that cannot be used are skipped and listed in ``problems`` with their reason. When a
    few files changed since the last run, only those are decoded again.

    Raises:
        DatasetError: a class has no usable training image (the message names the classes).
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    cache_dir = Path(cache_dir)
    keys, problems = _keys(index)
    fingerprint = _fingerprint(index, keys, image_size, resize_mode)
    folder = cache_dir / fingerprint
    if (folder / "meta.json").is_file() and (folder / "images.npy").is_file():
        cache = _read_cache(folder, index, problems)
        log.info("image cache %s reused: %d images at %d px, nothing decoded", fingerprint, len(cache), image_size)
        return cache

    old_images, old_rows, old_failed = (
        _previous_rows(cache_dir, image_size, resize_mode, index.root) if cache_dir.is_dir() else (None, {}, {})
    )
    images = np.zeros((len(index.samples), image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(len(index.samples), dtype=bool)
    reasons: dict[int, str] = {}
    jobs = []
    for i, (s, key) in enumerate(zip(index.samples, keys)):
        if key is None:
            continue
        row = old_rows.get(key)
        if row is not None and old_images is not None:
            images[i] = old_images[row]
            ok[i] = True
        elif key in old_failed:
            reasons[i] = old_failed[key]
        else:
            jobs.append((i, str(s.path), image_size, resize_mode, s.bbox))
    if jobs:
        _decode_all(jobs, images, ok, reasons, workers, show_progress)
    failed = [(str(index.samples[i].path), keys[i], r) for i, r in sorted(reasons.items())]
    problems = sorted(index.problems + problems + [Problem(p, r) for p, _, r in failed], key=lambda p: p.path)
    for p in problems:
        log.warning("skipped %s: %s", p.path, p.reason)
    keep = np.flatnonzero(ok)
    cache = ImageCache(
        images=images[keep] if len(keep) < len(images) else images,
        labels=np.array([index.samples[i].label for i in keep], dtype=np.int64),
        splits=np.array([index.samples[i].split for i in keep], dtype="<U5"),
        paths=[str(index.samples[i].path) for i in keep],
        class_names=list(index.class_names),
        problems=problems,
        fingerprint=fingerprint,
        image_size=image_size,
        resize_mode=resize_mode,
        decoded=len(jobs),
    )
    cache.warnings = check_classes(cache)
    _write_cache(folder, cache, [keys[i] for i in keep], index.root, failed)
    log.info(
        "image cache %s built: %d images at %d px (%d decoded, %d reused, %d skipped)",
        fingerprint, len(cache), image_size, len(jobs), len(index.samples) - len(jobs), len(problems),
    )
    return cache


def _decode_all(jobs, images, ok, reasons, workers, show_progress) -> None:
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    bar = progress(total=len(jobs), desc="decoding images", unit="img", enabled=show_progress)
    if workers <= 1 or len(jobs) < 64:
        results = map(_decode_job, jobs)
        _collect(results, images, ok, reasons, bar)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_decode_job, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
            _collect(results, images, ok, reasons, bar)
    bar.close()


def _collect(results, images, ok, reasons, bar) -> None:
    for i, arr, reason in results:
        if arr is None:
            reasons[i] = reason
        else:
            images[i] = arr
            ok[i] = True
        bar.update(1)


def _write_cache(folder: Path, cache: ImageCache, keys: list[str], root: Path, failed: list[tuple[str, str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"images.npy.{os.getpid()}.tmp"  # workers that build together never share a file
    with open(tmp, "wb") as f:
        np.save(f, cache.images)
    meta = {
        "version": CACHE_VERSION,
        "root": str(root),
        "image_size": cache.image_size,
        "resize_mode": cache.resize_mode,
        "class_names": cache.class_names,
        "paths": cache.paths,
        "keys": keys,
        "labels": cache.labels.tolist(),
        "splits": cache.splits.tolist(),
        "failed": [list(f) for f in failed],
        "warnings": cache.warnings,
    }
    os.replace(tmp, folder / "images.npy")  # images first: meta.json marks a complete cache
    tmp_meta = folder / f"meta.json.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, folder / "meta.json")


def _read_cache(folder: Path, index: DatasetIndex, unreadable: list[Problem]) -> ImageCache:
    """A complete cache; its problems are this scan's plus the decode failures it recorded."""
    meta = json.loads((folder / "meta.json").read_text())
    failed = [Problem(path, reason) for path, _, reason in meta["failed"]]
    return ImageCache(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        labels=np.array(meta["labels"], dtype=np.int64),
        splits=np.array(meta["splits"], dtype="<U5"),
        paths=meta["paths"],
        class_names=meta["class_names"],
        problems=sorted(index.problems + unreadable + failed, key=lambda p: p.path),
        fingerprint=folder.name,
        image_size=meta["image_size"],
        resize_mode=meta["resize_mode"],
        decoded=0,
        warnings=meta.get("warnings", []),
    )


def check_classes(cache: ImageCache) -> list[str]:
    """Fail on classes that cannot be trained; return warnings for ones that degrade scoring.

    Raises:
        DatasetError: some class has no usable training (train/ or pool) image.
    """
    trainable = np.isin(cache.splits, ("train", "pool"))
    counts = np.bincount(cache.labels[trainable], minlength=cache.num_classes)
    empty = [cache.class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(
            f"{len(empty)} class(es) have no usable training image: {', '.join(empty)} "
            "(empty folders, or every file was skipped; see the skipped-file list above)"
        )
    notes = []
    single = [cache.class_names[c] for c in np.flatnonzero(counts == 1)]
    if single:
        notes.append(f"classes with a single training image (absent from validation): {', '.join(single)}")
    if (cache.splits == "test").any():
        test_counts = np.bincount(cache.labels[cache.splits == "test"], minlength=cache.num_classes)
        missing = [cache.class_names[c] for c in np.flatnonzero(test_counts == 0)]
        if missing:
            notes.append(f"classes without a usable test image (absent from the holdout): {', '.join(missing)}")
    for note in notes:
        log.warning(note)
    return notes


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Row indices into an ``ImageCache`` for each role (see DESIGN decision 2)."""

    train: np.ndarray
    val: np.ndarray
    holdout: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "holdout": len(self.holdout)}


def stratified_partition(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` per class into (first, rest) with ``fraction`` of each class first.

    Each class contributes ``round(fraction * n)`` images to the first part (at least one),
    so every class's share is within one image of the target. The order inside a class is a
    seeded permutation, so a larger fraction only moves the cut: parts are nested across
    fractions for the same seed.
    """
    first, rest = [], []
    for c in np.unique(labels[indices]):
        members = np.sort(indices[labels[indices] == c])
        members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        n_first = min(len(members), max(1, math.floor(fraction * len(members) + 0.5)))
        first.append(members[:n_first])
        rest.append(members[n_first:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(first), cat(rest)


def holdout_indices(cache: ImageCache, holdout_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, holdout): the dataset's test/ folder when it has one, else a seeded stratified draw."""
    is_test = cache.splits == "test"
    if is_test.any():
        return np.flatnonzero(~is_test), np.flatnonzero(is_test)
    everything = np.arange(len(cache))
    if holdout_fraction <= 0:
        return everything, np.zeros(0, dtype=np.int64)
    # Drawn with its own seed stream, independent of train_ratio, so it never moves.
    return stratified_partition(everything, cache.labels, 1.0 - holdout_fraction, seed=split_seed + 1_000_003)


def make_splits(cache: ImageCache, train_ratio: float, holdout_fraction: float, split_seed: int) -> Splits:
    """Fixed holdout, then ``train_ratio`` of the pool (per class) for training, the rest for validation."""
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be in (0, 1), got {train_ratio}")
    pool, holdout = holdout_indices(cache, holdout_fraction, split_seed)
    train, val = stratified_partition(pool, cache.labels, train_ratio, seed=split_seed)
    return Splits(train=train, val=val, holdout=holdout)


def holdout_protocol(cache: ImageCache, holdout_fraction: float) -> str:
    """One sentence that says where the holdout came from."""
    if (cache.splits == "test").any():
        return "the dataset's own test/ folder is the fixed holdout (published-benchmark protocol)"
    return f"a stratified, seeded {holdout_fraction:.0%} of the images is the fixed holdout"


# --------------------------------------------------------------------------- device batches


@dataclass
class Augment:
    """Batch augmentation for training, applied on the device.

    Attributes:
        crop_scale: area range of random-resized crops, as fractions of the image (0-1].
        crop_ratio: aspect-ratio range of the crops.
        hflip: flip half of the images horizontally.
        enabled: False = use the centre view for training too.
    """

    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    enabled: bool = True


def normalize(batch_u8: torch.Tensor) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, S, S)`` float normalised with ImageNet statistics.

    The permuted view of NHWC data is already channels_last in memory, which is what the
    CUDA convolutions prefer.
    """
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random-resized crop and horizontal flip of a normalised batch, in one ``grid_sample``."""
    if not aug.enabled:
        return x
    b, device = x.shape[0], x.device
    r = torch.rand(b, 5, generator=generator, device=generator.device).to(device)
    lo, hi = aug.crop_scale
    area = lo + (hi - lo) * r[:, 0]
    log_lo, log_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * r[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * r[:, 2] - 1)
    cy = (1 - h) * (2 * r[:, 3] - 1)
    flip = torch.where(r[:, 4] < 0.5, -1.0, 1.0) if aug.hflip else torch.ones_like(w)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class DeviceData:
    """The images and labels of one cache, placed once where training will read them.

    On CUDA the uint8 array is copied into GPU memory when it fits ``max_gpu_fraction`` of the
    free memory, otherwise into pinned host memory; on CPU it stays in host memory.
    """

    def __init__(self, cache: ImageCache, device: torch.device, max_gpu_fraction: float = 0.5):
        self.device = device
        images = torch.from_numpy(np.array(cache.images))  # a writable in-memory copy of the memmap
        labels = torch.from_numpy(cache.labels)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if images.numel() <= max_gpu_fraction * free:
                images, labels = images.to(device), labels.to(device)
            else:
                log.info("image cache (%.1f GB) kept in pinned host memory", images.numel() / 1e9)
                images, labels = images.pin_memory(), labels.pin_memory()
        self.images, self.labels = images, labels
        self.num_classes = cache.num_classes

    def batches(
        self,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(x, y)`` batches on the device, in order or shuffled.

        When shuffling (training), a trailing batch of a single image is dropped: batch norm
        cannot train on it.
        """
        for rows in self.batch_rows(indices, batch_size, shuffle, generator):
            yield self.inputs(rows), self.targets(rows)

    def batch_rows(
        self, indices: np.ndarray, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        """The row indices of each batch (on the images' device), as ``batches`` cuts them."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if shuffle:
            idx = idx[torch.randperm(len(idx), generator=generator)]
        idx = idx.to(self.images.device)
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            if shuffle and len(rows) < 2:
                break
            yield rows

    def inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """Normalised images of ``rows`` (from ``batch_rows``) on the training device."""
        return normalize(self.images.index_select(0, rows).to(self.device, non_blocking=True))

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        """Labels of ``rows`` on the training device."""
        return self.labels.index_select(0, rows.to(self.labels.device)).to(self.device, non_blocking=True)
