"""Prepare (import) a dataset once: decode, hash, check, and write what was found.

    python -m flows.prepare --source data/stanford_cars --dest studies/data/cars --crop bbox

``open_dataset`` is the single entry point for reading a dataset (class folders, a Stanford
Cars devkit, or a manifest). ``prepare`` writes three files to the destination folder:

    manifest.csv   one row per usable image (datasets/manifest.py); a study's [data] path may point here
    summary.json   class histogram and image-size distribution, for the report
    problems.csv   every file left out or suspect, and why (also logged as one table)

Preparing again is cheap: decoded images are reused by file key (``data.load_cache``) and
hashes by (path, size, mtime_ns) from the previous manifest (and, given a cache_dir, from its
hash cache: ``datasets/hashes.py``, which the study reads too), so only changed or added files
are read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..images.cache import load_cache
from ..images.decode import ImageProblem, decode_image
from .base import SPLITS, ClassCounts, DatasetError, DatasetIndex, Problem, Sample
from .hashes import file_key, hash_files, is_sha256, same_content
from .hashes import sha256_file as sha256_file  # re-exported: the hash in the manifest's sha256 column
from .manifest import (
    INFO_COLUMNS,
    MANIFEST_NAME,
    PROBLEMS_NAME,
    read_manifest_frame,
    write_manifest,
    write_problems,
)
from .open import open_dataset

log = logging.getLogger(__name__)

#: Resolution of the validating decode, in pixels: small, as it only has to prove each file decodes.
VALIDATE_SIZE = 64
SUMMARY_NAME = "summary.json"
#: Folder under the destination for the validating decode's cache (when no cache_dir is given).
CACHE_SUBDIR = "cache"
#: Edges of the shorter-side histogram in summary.json, in pixels.
SIZE_BINS = (0, 64, 128, 224, 256, 384, 512, 768, 1024, 2048)
_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------- checks


def validate_images(
    index: DatasetIndex,
    image_size: int,
    cache_dir: str | Path,
    workers: int | None = None,
    show_progress: bool = True,
) -> tuple[list[Sample], list[Problem], int]:
    """Decode every file once through ``data.load_cache`` (reusing earlier decodes).

    Returns:
        The usable samples, the problems of the unusable files, and how many files were decoded.
    """
    if not index.samples:
        return [], [], 0
    # Every image as a pool image of its class: the test/ split plays no part in decoding, and
    # class coverage is checked afterwards (check_coverage). Scan problems stay out: the cache
    # does not track them.
    pooled = replace(index, samples=[replace(s, split="pool") for s in index.samples], problems=[])
    try:
        cache = load_cache(pooled, image_size, cache_dir, workers=workers, show_progress=show_progress)
    except DatasetError:
        # A class without a decodable image, or a single class: load_cache refuses such a dataset
        # before it lists its bad files, and listing them is the point here, so decode file by file.
        return *_decode_one_by_one(index.samples, image_size), len(index.samples)
    usable = set(cache.paths)
    return [s for s in index.samples if str(s.path) in usable], list(cache.problems), cache.decoded


def _decode_one_by_one(samples: list[Sample], image_size: int) -> tuple[list[Sample], list[Problem]]:
    """(usable samples, problems of the others), one decode at a time."""
    usable, problems = [], []
    for s in samples:
        reason = _decode_problem(s, image_size)
        if reason is None:
            usable.append(s)
        else:
            problems.append(Problem(str(s.path), reason))
    return usable, problems


def _decode_problem(sample: Sample, image_size: int) -> str | None:
    """Why ``sample`` cannot be decoded; None when it can."""
    try:
        decode_image(sample.path, image_size, bbox=sample.bbox)
    except ImageProblem as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        return f"could not decode: {type(exc).__name__}: {exc}"
    return None


def image_dimensions(path: Path) -> tuple[int | str, int | str]:
    """(width, height) from the file header, after EXIF orientation; ("", "") when unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):  # rotated by 90 degrees
                    width, height = height, width
    except Exception as exc:  # noqa: BLE001 - the file decoded already; the size is only informative
        log.debug("no header size for %s: %s", path, exc)
        return "", ""
    return width, height


def _previous_info(manifest: Path) -> dict[tuple[str, int, int], dict]:
    """Hash and size of every file in an earlier manifest, keyed by (path, size, mtime_ns).

    A damaged manifest (unreadable, cut short, garbled cells) never stops prepare: what cannot
    be trusted is left out with a warning, and those files are hashed again.
    """
    if not manifest.is_file():
        return {}
    try:
        frame = read_manifest_frame(manifest)
    except DatasetError as exc:
        log.warning("previous manifest ignored, every file is hashed again: %s", exc)
        return {}
    missing = [c for c in INFO_COLUMNS if c not in frame.columns]
    if missing:
        log.warning("previous manifest %s lacks column(s) %s; every file is hashed again", manifest, ", ".join(missing))
        return {}
    info, damaged = {}, 0
    for row in frame.itertuples(index=False):
        try:
            facts = {
                "sha256": str(row.sha256),
                "width": _dimension(row.width),
                "height": _dimension(row.height),
                "size": int(row.size),
                "mtime_ns": int(row.mtime_ns),
            }
        except (TypeError, ValueError):  # an empty or damaged cell (NaN in a row cut short)
            damaged += 1
            continue
        if is_sha256(facts["sha256"]):
            info[(row.path, facts["size"], facts["mtime_ns"])] = facts
        else:
            damaged += 1
    if damaged:
        log.warning("previous manifest %s: %d damaged row(s) ignored, those files are hashed again", manifest, damaged)
    return info


def _dimension(cell: str) -> int | str:
    """A width or height cell: blank where ``image_dimensions`` could not read the header."""
    return "" if cell == "" else int(cell)


def file_info(
    samples: list[Sample],
    previous: dict[tuple[str, int, int], dict],
    show_progress: bool = True,
    cache_dir: str | Path | None = None,
) -> tuple[dict[str, dict], int, list[Problem]]:
    """Hash and header size of every file, reusing ``previous`` for files whose size and mtime are
    unchanged, and hashes from the hash cache in ``cache_dir`` (``hashes.hash_files``; None = none).

    Returns:
        Facts by ``str(sample.path)`` (keys of ``manifest.INFO_COLUMNS``), files hashed, and problems.
    """
    info, problems, todo = {}, [], []
    for s in samples:
        try:
            key = file_key(s.path)
        except OSError as exc:
            problems.append(Problem(str(s.path), f"cannot be read: {exc.strerror or exc}"))
            continue
        known = previous.get(key)
        if known is not None:
            info[key[0]] = known
        else:
            todo.append(key)
    digests, n_hashed, unreadable = hash_files(todo, cache_dir, show_progress)
    for key in todo:
        if key in digests:
            width, height = image_dimensions(Path(key[0]))
            info[key[0]] = {
                "sha256": digests[key],
                "width": width,
                "height": height,
                "size": key[1],
                "mtime_ns": key[2],
            }
    return info, n_hashed, problems + unreadable


def find_leaks(samples: list[Sample], info: dict[str, dict], root: Path | None = None) -> list[Problem]:
    """Test files whose bytes equal a training file's: the holdout would score memorised images.

    Args:
        root: training files below it are named relative to it in the reasons.
    """
    test = [s for s in samples if s.split == "test"]
    train = [s for s in samples if s.split != "test"]
    test_hashes = [info[str(s.path)]["sha256"] for s in test]
    train_hashes = [info[str(s.path)]["sha256"] for s in train]
    problems = []
    for i, copies in sorted(same_content(test_hashes, train_hashes).items()):
        more = f" and {len(copies) - 1} more" if len(copies) > 1 else ""
        first = _short(str(train[copies[0]].path), root)
        problems.append(Problem(str(test[i].path), f"same image as training file {first}{more} (train/test leak)"))
    return problems


def check_coverage(class_names: list[str], samples: list[Sample]) -> tuple[str | None, list[Problem], list[str]]:
    """The decode's class rule (``datasets.base.ClassCounts``) on the usable samples.

    Returns:
        Why no study can run on them (one line) or None; a problem line per class without a
        usable training image; warnings about classes that cannot be fully scored.
    """
    counts = ClassCounts.of(class_names, [s.label for s in samples], [s.split for s in samples])
    problems = [Problem(f"class {name}", "no usable training image") for name in counts.names(counts.train == 0)]
    return counts.error(), problems, counts.warnings()


# --------------------------------------------------------------------------- reporting


def summarize(index: DatasetIndex, info: dict[str, dict], problems: list[Problem], notes: list[str]) -> dict:
    """What summary.json holds: counts per split and class, and the image-size distribution."""
    splits = [split for split in SPLITS if any(s.split == split for s in index.samples)]
    per_class = Counter((s.label, s.split) for s in index.samples)
    sizes = [(info[str(s.path)]["width"], info[str(s.path)]["height"]) for s in index.samples]
    sizes = [(w, h) for w, h in sizes if w != "" and h != ""]
    return {
        "source": index.source,
        "root": str(index.root),
        "crop": any(s.bbox is not None for s in index.samples),
        "images": len(index.samples),
        "classes": index.num_classes,
        "splits": {split: sum(per_class[(i, split)] for i in range(index.num_classes)) for split in splits},
        "class_histogram": [
            {"label": i, "class": name, **{split: per_class[(i, split)] for split in splits}}
            for i, name in enumerate(index.class_names)
        ],
        "image_sizes": _size_distribution(sizes),
        "problems": len(problems),
        "warnings": notes,
    }


def _size_distribution(sizes: list[tuple[int, int]]) -> dict:
    if not sizes:
        return {}
    wh = np.array(sizes, dtype=np.int64)
    shorter = wh.min(axis=1)
    edges = [*SIZE_BINS, np.inf]
    counts, _ = np.histogram(shorter, bins=edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(SIZE_BINS, SIZE_BINS[1:])] + [f">={SIZE_BINS[-1]}"]
    common = Counter(map(tuple, wh.tolist())).most_common()
    common.sort(key=lambda c: (-c[1], c[0]))
    return {
        "width": _stats(wh[:, 0]),
        "height": _stats(wh[:, 1]),
        "shorter_side_histogram": {label: int(n) for label, n in zip(labels, counts)},
        "most_common": [{"width": w, "height": h, "count": n} for (w, h), n in common[:10]],
    }


def _stats(values: np.ndarray) -> dict[str, int]:
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return {
        "min": int(values.min()),
        "p5": round(p5),
        "median": round(median),
        "mean": round(values.mean()),
        "p95": round(p95),
        "max": int(values.max()),
    }


def _short(path: str, root: Path | None) -> str:
    if root is not None and path.startswith(str(root) + os.sep):
        return path[len(str(root)) + 1 :]
    return path


def format_problem_table(problems: list[Problem], root: Path | None = None) -> str:
    """The problems as a two-column text table; paths below ``root`` are shown relative to it."""
    rows = [(_short(p.path, root), p.reason) for p in problems]
    width = max([len("file"), *(len(f) for f, _ in rows)])
    return "\n".join(f"{f:<{width}}  {r}" for f, r in [("file", "problem"), *rows])


# --------------------------------------------------------------------------- prepare


@dataclass
class PrepareResult:
    """What ``prepare`` wrote and found.

    Attributes:
        index: the usable images, as listed in the manifest (problems: everything found).
        manifest_path, summary_path, problems_path: the files written to the destination.
        n_hashed: files hashed by this call (0 = every hash reused from the previous manifest or the hash cache).
        n_decoded: files decoded by this call (0 = every decode reused from the cache).
        problems: files left out or suspect, and classes without training images.
    """

    index: DatasetIndex
    manifest_path: Path
    summary_path: Path
    problems_path: Path
    n_hashed: int
    n_decoded: int
    problems: list[Problem]


def prepare(
    source: str | Path,
    dest: str | Path,
    format: str = "auto",
    crop: str | None = None,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    show_progress: bool = True,
) -> PrepareResult:
    """Import ``source``, decode and hash every image, and write manifest, summary and problems to ``dest``.

    Bad files never stop the run: they are left out of the manifest and listed in
    problems.csv and the log. Unchanged files are neither decoded nor hashed again.

    Args:
        source, format, crop: the dataset, as for ``open_dataset``.
        dest: output folder (created); must lie outside a folder or devkit source.
        image_size: resolution of the validating decode in pixels; default VALIDATE_SIZE.
            Give the study's size and cache_dir to have the study reuse the decode.
        cache_dir: where decoded images are cached; default ``dest/cache``. Given, its hash cache
            (``hashes.HASHES_FILE``) is read and written too, so the study reuses the hashes.
        workers: decoding processes; default one per CPU from 512 images (``PARALLEL_MIN_IMAGES``), else none.

    Raises:
        DatasetError: the source cannot be opened, ``dest`` lies inside it, or some class has
            no usable training image or fewer than two classes have one (raised after the three
            files are written).
    """
    index = open_dataset(source, format, crop)
    dest = _check_dest(Path(dest).expanduser().absolute(), Path(source).expanduser(), index)
    usable, problems, n_decoded = validate_images(
        index, image_size or VALIDATE_SIZE, cache_dir or dest / CACHE_SUBDIR, workers, show_progress
    )
    if cache_dir is None:
        _prune_cache(dest / CACHE_SUBDIR)
    info, n_hashed, unreadable = file_info(usable, _previous_info(dest / MANIFEST_NAME), show_progress, cache_dir)
    usable = [s for s in usable if str(s.path) in info]
    error, class_problems, notes = check_coverage(index.class_names, usable)
    problems = [*index.problems, *problems, *unreadable, *find_leaks(usable, info, index.root)]
    problems = sorted(problems, key=lambda p: p.path) + class_problems
    kept = DatasetIndex(index.root, index.class_names, usable, problems, source=index.source)

    manifest_path = write_manifest(dest / MANIFEST_NAME, kept, info)
    summary_path = dest / SUMMARY_NAME
    summary = summarize(kept, info, problems, notes)
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    problems_path = write_problems(dest / PROBLEMS_NAME, problems)
    _log_outcome(kept, problems, notes, n_decoded, n_hashed, dest)
    if error:
        raise DatasetError(f"{error} (see {problems_path})")
    return PrepareResult(kept, manifest_path, summary_path, problems_path, n_hashed, n_decoded, problems)


def _prune_cache(cache_dir: Path) -> None:
    """Keep only the newest decode in prepare's own cache: the next run reuses rows from it."""
    folders = sorted((m.stat().st_mtime_ns, m.parent) for m in cache_dir.glob("*/meta.json"))
    for _, folder in folders[:-1]:
        shutil.rmtree(folder, ignore_errors=True)


def _check_dest(dest: Path, source: Path, index: DatasetIndex) -> Path:
    if dest.exists() and not dest.is_dir():
        raise DatasetError(f"destination {dest} is a file, not a folder")
    if index.source != "manifest":
        inside = [r for r in (source.resolve(), index.root) if dest.resolve() == r or r in dest.resolve().parents]
        if inside:
            raise DatasetError(f"destination {dest} lies inside the dataset {inside[0]}; choose a folder outside it")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _log_outcome(
    index: DatasetIndex, problems: list[Problem], notes: list[str], n_decoded: int, n_hashed: int, dest: Path
) -> None:
    splits = Counter(s.split for s in index.samples)
    log.info(
        "prepared %s: %d images, %d classes (%s); %d decoded, %d hashed; written to %s",
        index.root,
        len(index.samples),
        index.num_classes,
        ", ".join(f"{splits[split]} {split}" for split in SPLITS if split in splits),
        n_decoded,
        n_hashed,
        dest,
    )
    for note in notes:
        log.warning(note)
    if problems:
        log.warning(
            "%d problem(s), also in %s:\n%s",
            len(problems),
            dest / PROBLEMS_NAME,
            format_problem_table(problems, index.root),
        )
    else:
        log.info("no problems found")
