"""The decode-once image cache: every image decoded a single time, memory-mapped afterwards.

One pass decodes (and so validates) every file into a uint8 array at training resolution; the
array is stored on disk under a fingerprint of the files and the decoding settings, and later
runs memory-map it instead of decoding again. When a few files changed, only those are decoded.

    >>> cache = load_cache(scan_folders("data/cars"), image_size=224, cache_dir="studies/cache")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import RESIZE_MODES
from ..datasets.base import DatasetError, DatasetIndex, Problem
from ..progress import progress
from .decode import ImageProblem, decode_image

log = logging.getLogger(__name__)

#: Bump when the on-disk cache layout or the decoding changes, so old caches are not reused.
CACHE_VERSION = 2
#: The files of one cache folder (``<cache_dir>/<fingerprint>/``); meta.json is written last.
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"


def _decode_job(job: tuple[int, str, int, str, tuple | None]) -> tuple[int, np.ndarray | None, str | None]:
    i, path, size, mode, bbox = job
    try:
        return i, decode_image(path, size, mode, bbox), None
    except ImageProblem as exc:
        return i, None, str(exc)
    except Exception as exc:  # a decoder bug on one file must not stop the whole pass
        return i, None, f"could not decode: {type(exc).__name__}: {exc}"


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


def cache_state(index: DatasetIndex, image_size: int, cache_dir: str | Path, resize_mode: str = "center_crop") -> str:
    """The cache folder's key plus whether it is complete and intact: it changes when the files
    change and when the cache is damaged (the flow's task cache uses it)."""
    fingerprint = dataset_fingerprint(index, image_size, resize_mode)
    folder = Path(cache_dir) / fingerprint
    return f"{fingerprint}-{'ok' if verify_cache(folder) is None else 'rebuild'}-{Path(cache_dir).resolve()}"


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
    for meta_path in cache_dir.glob(f"*/{META_FILE}"):
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
        images = np.load(folder / IMAGES_FILE, mmap_mode="r")
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
    if (folder / META_FILE).is_file() and (folder / IMAGES_FILE).is_file():
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
    tmp = folder / f"{IMAGES_FILE}.{os.getpid()}.tmp"  # workers that build together never share a file
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
    os.replace(tmp, folder / IMAGES_FILE)  # images first: meta.json marks a complete cache
    tmp_meta = folder / f"{META_FILE}.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, folder / META_FILE)


def verify_cache(folder: Path) -> str | None:
    """Why the cache in ``folder`` cannot be used (None = complete and intact)."""
    meta_path, images_path = folder / META_FILE, folder / IMAGES_FILE
    if not meta_path.is_file() or not images_path.is_file():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(images_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    if images.shape[0] != len(meta.get("labels", [])):
        return f"{images.shape[0]} images for {len(meta.get('labels', []))} labels"
    return None


def _read_cache(folder: Path, index: DatasetIndex, unreadable: list[Problem]) -> ImageCache:
    """A complete cache; its problems are this scan's plus the decode failures it recorded."""
    meta = json.loads((folder / META_FILE).read_text())
    failed = [Problem(path, reason) for path, _, reason in meta["failed"]]
    return ImageCache(
        images=np.load(folder / IMAGES_FILE, mmap_mode="r"),
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


def open_cache_folder(folder: str | Path | None) -> tuple[np.ndarray | None, list[str], str]:
    """(memory-mapped images, file path of each row, why not) of one cache folder, for readers
    other than training (the report's thumbnails); never raises."""
    if not folder:
        return None, [], "the study did not record where its decode cache is"
    folder = Path(folder)
    try:
        images = np.load(folder / IMAGES_FILE, mmap_mode="r")
        paths = json.loads((folder / META_FILE).read_text())["paths"]
    except (OSError, ValueError, KeyError) as exc:
        return None, [], f"the decode cache {folder} is gone or unreadable ({type(exc).__name__})"
    return images, paths, ""
