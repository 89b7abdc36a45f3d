"""The decode-once image cache: every image decoded a single time, memory-mapped afterwards.

One pass decodes (and so validates) every file into a uint8 array at training resolution; the
array is stored on disk under a fingerprint of the files and the decoding settings, and later
runs memory-map it instead of decoding again. When a few files changed, only those are decoded.

The cache checks itself whenever it is opened: meta.json records the images array's shape,
dtype, file size and checksum (``sampled_checksum``), and a folder that does not match them
(a truncated or partly copied images.npy, a damaged meta.json) is reported once, removed and
decoded again; it is never reused.

    >>> cache = load_cache(scan_folders("data/cars"), image_size=224, cache_dir="studies/cache")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import RESIZE_MODES
from ..datasets.base import ClassCounts, DatasetError, DatasetIndex, Problem
from ..progress import progress
from .decode import ImageProblem, decode_image

log = logging.getLogger(__name__)

#: Bump when the on-disk cache layout, the decoding or the checksum changes, so old caches are
#: not reused (3: meta.json records the images array's size and checksum).
CACHE_VERSION = 3
#: The files of one cache folder (``<cache_dir>/<fingerprint>/``); meta.json is written last.
IMAGES_FILE = "images.npy"
META_FILE = "meta.json"
#: What meta.json must hold for its folder to be read; "images" is the record of images.npy
#: (array shape and dtype, file size in bytes, ``sampled_checksum`` of the file).
META_KEYS = (
    "version",
    "root",
    "image_size",
    "resize_mode",
    "class_names",
    "paths",
    "keys",
    "labels",
    "splits",
    "failed",
    "images",
)
#: meta.json keys an earlier cache must share for its rows to be reused (``_previous_rows``).
SETTING_KEYS = ("version", "image_size", "resize_mode", "root")
#: ``sampled_checksum`` hashes this many evenly spaced blocks (first and last included) ...
SAMPLE_BLOCKS = 256
#: ... of this many bytes each: 16 MiB in all, however large the data; less data is hashed whole.
SAMPLE_BLOCK_BYTES = 1 << 16


class CacheUnusable(Exception):
    """Why a cache folder cannot be used. ``damaged``: it claims to be complete (has a meta.json)
    but does not match it, so it must be removed; else it is unfinished or made for other settings."""

    def __init__(self, reason: str, damaged: bool = True):
        super().__init__(reason)
        self.damaged = damaged


def sampled_checksum(data: np.ndarray | str | Path) -> str:
    """A cheap checksum of an array's bytes or a file's: BLAKE2b over the byte count and
    SAMPLE_BLOCKS evenly spaced blocks of SAMPLE_BLOCK_BYTES (first and last included), or over
    every byte when there are at most 16 MiB.

    Why sampled: hashing all of a 2.4 GB decode cache takes over 10 s, on every open and every
    Prefect cache-key check; 16 MiB take about 0.1 s (0.3 s from a cold disk; a file is read
    with ``pread``, which is ten times faster cold than faulting the pages of a memory map). It
    catches truncation and padding (the byte count), a file from another build, and any damaged
    run of bytes longer than 1/SAMPLE_BLOCKS of the data (the zeroed holes or tail of a partial
    copy); a few flipped bytes between the blocks of a large file go unnoticed.
    """
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            return _sampled_hash(os.fstat(f.fileno()).st_size, lambda start, n: os.pread(f.fileno(), n, start))
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return _sampled_hash(flat.nbytes, lambda start, n: flat[start : start + n])


def _sampled_hash(size: int, read) -> str:
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        h.update(read(0, size))
    else:
        for start in np.linspace(0, size - SAMPLE_BLOCK_BYTES, SAMPLE_BLOCKS, dtype=np.int64):
            h.update(read(int(start), SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


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


def cache_status(
    index: DatasetIndex, image_size: int, cache_dir: str | Path, resize_mode: str = "center_crop"
) -> tuple[str, bool]:
    """(the cache's key, whether its folder is complete and intact). The key changes when the
    files or the decoding settings change; a damaged or missing cache is not healthy, so the
    flow refreshes its task cache instead of reporting it Cached."""
    fingerprint = dataset_fingerprint(index, image_size, resize_mode)
    healthy = verify_cache(Path(cache_dir) / fingerprint) is None
    return f"{fingerprint}-{Path(cache_dir).resolve()}", healthy


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
    """The newest intact earlier cache of the same dataset and settings: (images, row by file
    key, failure reason by file key), so unchanged files are neither decoded nor retried."""
    settings = [CACHE_VERSION, image_size, resize_mode, str(root)]
    for meta_path in sorted(cache_dir.glob(f"*/{META_FILE}"), key=_age):
        try:
            meta, images = _open_cache(meta_path.parent, settings)
        except CacheUnusable:
            continue
        failed = {key: reason for _, key, reason in meta["failed"]}
        return images, {key: row for row, key in enumerate(meta["keys"])}, failed
    return None, {}, {}


def _age(path: Path) -> float:
    try:
        return -path.stat().st_mtime
    except OSError:  # removed meanwhile (by a process that found it damaged)
        return 0.0


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
    try:
        meta, cached = _open_cache(folder)
    except CacheUnusable:
        pass  # never built, or damaged (reported and removed): decode
    else:
        cache = _read_cache(folder, meta, cached, index, problems)
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
        fingerprint,
        len(cache),
        image_size,
        len(jobs),
        len(index.samples) - len(jobs),
        len(problems),
    )
    return cache


#: With no worker count given, fewer images than this are decoded in this process: a worker
#: process can cost seconds of interpreter start and imports (where multiprocessing spawns, as
#: in a Prefect flow-run process), more than decoding a few hundred images takes.
PARALLEL_MIN_IMAGES = 512


def _decode_all(jobs, images, ok, reasons, workers, show_progress) -> None:
    if workers is None:
        workers = min(len(jobs), os.cpu_count() or 1) if len(jobs) >= PARALLEL_MIN_IMAGES else 1
    bar = progress(total=len(jobs), desc="decoding images", unit="img", enabled=show_progress)
    if workers <= 1 or len(jobs) < 2:
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


def _write_cache(
    folder: Path, cache: ImageCache, keys: list[str], root: Path, failed: list[tuple[str, str, str]]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{IMAGES_FILE}.{os.getpid()}.tmp"  # workers that build together never share a file
    with open(tmp, "wb") as f:
        np.save(f, cache.images)
    record = {
        "shape": list(cache.images.shape),
        "dtype": str(cache.images.dtype),
        "bytes": tmp.stat().st_size,
        "checksum": sampled_checksum(tmp),  # of the bytes as written (still in the page cache)
    }
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
        "images": record,
    }
    os.replace(tmp, folder / IMAGES_FILE)  # images first: meta.json marks a complete cache
    tmp_meta = folder / f"{META_FILE}.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, folder / META_FILE)


def verify_cache(folder: Path) -> str | None:
    """Why the cache in ``folder`` cannot be used (None = complete and intact); changes nothing."""
    try:
        _check_cache(Path(folder))
    except CacheUnusable as exc:
        return str(exc)
    return None


def _open_cache(folder: Path, settings: list | None = None, older: bool = False) -> tuple[dict, np.ndarray]:
    """meta.json and the memory-mapped images of an intact cache folder; a damaged one is
    reported and removed, so it is rebuilt and never reused.

    Raises:
        CacheUnusable: the folder cannot be used (see ``_check_cache``).
    """
    try:
        return _check_cache(folder, settings, older)
    except CacheUnusable as exc:
        if exc.damaged:
            _discard(folder, str(exc))
        raise


def _check_cache(folder: Path, settings: list | None = None, older: bool = False) -> tuple[dict, np.ndarray]:
    """meta.json and the memory-mapped images of ``folder``, checked against each other.

    Args:
        settings: values of SETTING_KEYS the cache must have been made with (None = any).
        older: accept a cache written before caches recorded a checksum (an older study's,
            which only a reader such as the report opens), checking only that it loads.

    Raises:
        CacheUnusable: why not (damaged, unfinished, or made with other settings).
    """
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except FileNotFoundError:
        raise CacheUnusable(f"no {META_FILE} (never completed, or removed)", damaged=False) from None
    except (OSError, ValueError) as exc:
        raise CacheUnusable(f"{META_FILE} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise CacheUnusable(f"{META_FILE} holds a {type(meta).__name__}, not an object")
    if settings is not None and [meta.get(k) for k in SETTING_KEYS] != settings:
        raise CacheUnusable("made with other settings", damaged=False)
    if older and meta.get("version") != CACHE_VERSION:
        try:
            return meta, np.load(folder / IMAGES_FILE, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CacheUnusable(f"{IMAGES_FILE} is unreadable ({type(exc).__name__}: {exc})", damaged=False) from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CacheUnusable(f"{META_FILE} lacks {', '.join(missing)}")
    try:
        return meta, _check_images(folder / IMAGES_FILE, meta)
    except (KeyError, TypeError, ValueError) as exc:  # valid JSON of the wrong structure
        raise CacheUnusable(f"{META_FILE} is malformed ({type(exc).__name__}: {exc})") from None


def _check_images(path: Path, meta: dict) -> np.ndarray:
    """images.npy memory-mapped, once its size, shape, dtype, rows and checksum match ``meta``."""
    record = meta["images"]
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CacheUnusable(f"{IMAGES_FILE} is missing or unreadable ({type(exc).__name__})") from None
    if size != record["bytes"]:
        raise CacheUnusable(f"{IMAGES_FILE} has {size} bytes, {META_FILE} records {record['bytes']} (cut short?)")
    try:
        images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CacheUnusable(f"{IMAGES_FILE} is unreadable ({type(exc).__name__}: {exc})") from None
    found, recorded = [str(images.dtype), list(images.shape)], [record["dtype"], record["shape"]]
    if found != recorded:
        raise CacheUnusable(f"{IMAGES_FILE} holds {found}, {META_FILE} records {recorded}")
    rows = {len(meta[k]) for k in ("paths", "keys", "labels", "splits")}
    if rows != {len(images)}:
        raise CacheUnusable(f"{META_FILE} lists {sorted(rows)} rows for {len(images)} images")
    if any(len(f) != 3 for f in meta["failed"]):
        raise CacheUnusable(f"{META_FILE} has malformed failed entries")
    if sampled_checksum(path) != record["checksum"]:
        raise CacheUnusable(f"{IMAGES_FILE} does not match its checksum (its bytes changed after it was written)")
    return images


def _discard(folder: Path, reason: str) -> None:
    """Report a damaged cache folder once and remove it."""
    log.warning("decode cache %s is damaged, removed and decoded again on next use: %s", folder, reason)
    aside = folder.with_name(f"{folder.name}.damaged-{os.getpid()}")
    try:
        os.rename(folder, aside)  # atomic, so a process rebuilding the folder meanwhile is not disturbed
    except OSError:  # another process set it aside first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _read_cache(
    folder: Path, meta: dict, images: np.ndarray, index: DatasetIndex, unreadable: list[Problem]
) -> ImageCache:
    """A complete cache; its problems are this scan's plus the decode failures it recorded."""
    failed = [Problem(path, reason) for path, _, reason in meta["failed"]]
    return ImageCache(
        images=images,
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
    """Fail on classes that cannot be trained; return warnings for ones that degrade scoring
    (the rule of ``datasets.base.ClassCounts``, which the import applies too).

    Raises:
        DatasetError: some class has no usable training (train/ or pool) image, or fewer than
            two classes have one.
    """
    counts = ClassCounts.of(cache.class_names, cache.labels, cache.splits)
    error = counts.error()
    if error:
        raise DatasetError(error)
    notes = counts.warnings()
    for note in notes:
        log.warning(note)
    return notes


def open_cache_folder(folder: str | Path | None) -> tuple[np.ndarray | None, list[str], str]:
    """(memory-mapped images, file path of each row, why not) of one cache folder, for readers
    other than training (the report's thumbnails); never raises. A damaged cache is reported
    and removed; one an older version wrote, without a checksum, is read as it is."""
    if not folder:
        return None, [], "the study did not record where its decode cache is"
    folder = Path(folder)
    try:
        meta, images = _open_cache(folder, older=True)
        return images, list(meta["paths"]), ""
    except (CacheUnusable, KeyError, TypeError) as exc:  # KeyError, TypeError: an older meta.json without paths
        return None, [], f"the decode cache {folder} cannot be used: {exc}"
