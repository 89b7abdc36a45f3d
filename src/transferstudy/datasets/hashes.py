"""Content hashes (SHA-256 of a file's bytes), each read once per version of a file.

    >>> digests, n_hashed, problems = hash_files([file_key(p) for p in paths], "studies/cache")
    >>> copies = find_copies(test_paths, train_paths, "studies/cache")  # {i: [j, ...]}

A file's hash is reused while its (path, size, mtime_ns) stays the same, from the hash cache
``hashes.json`` in a cache folder (the study's ``[data] cache_dir``; prepare's when given one)
and, for ``prepare``, from the manifest it wrote before. Both users of content hashes go
through here: prepare (the manifest's sha256 column, its train/test leak report) and the study
(holdout images whose bytes a training image shares are not scored: ``DecodedData.holdout_rows``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..progress import progress
from .base import Problem

log = logging.getLogger(__name__)

#: The hash cache in a cache folder: {"version", "files": {path: [size, mtime_ns, sha256]}}.
HASHES_FILE = "hashes.json"
#: Bump when the hash cache's layout or the hash changes, so old caches are not reused.
HASHES_VERSION = 1
_HASH_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: (path, size in bytes, mtime_ns): a version of a file, as ``file_key`` reads it.
FileKey = tuple[str, int, int]


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_sha256(text: str) -> bool:
    """Whether ``text`` looks like ``sha256_file``'s output (a recorded hash worth trusting)."""
    return bool(_SHA256.fullmatch(text))


def file_key(path: str | Path) -> FileKey:
    """The version of a file whose hash can be reused. Raises OSError when it cannot be read."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def hash_files(
    keys: Sequence[FileKey], cache_dir: str | Path | None, show_progress: bool = True
) -> tuple[dict[FileKey, str], int, list[Problem]]:
    """SHA-256 of each file: from the hash cache in ``cache_dir`` where it records this version of
    the file, else read (and then recorded there). ``cache_dir`` None: no hash cache.

    Returns:
        The hash of each readable key, how many files were read, and the unreadable files.
    """
    path = Path(cache_dir) / HASHES_FILE if cache_dir is not None else None
    cached = _load(path)
    digests, todo = {}, []
    for key in keys:
        record = cached.get(key[0])
        if record is not None and record[:2] == key[1:]:
            digests[key] = record[2]
        else:
            todo.append(key)
    problems = []
    bar = progress(total=len(todo), desc="hashing files", unit="file", enabled=show_progress and bool(todo))
    for key in todo:
        bar.update(1)
        try:
            digests[key] = sha256_file(key[0])
        except OSError as exc:
            problems.append(Problem(key[0], f"cannot be read: {exc.strerror or exc}"))
    bar.close()
    if path is not None and len(todo) > len(problems):
        _save(path, {key[0]: (*key[1:], digests[key]) for key in todo if key in digests})
    return digests, len(todo), problems


def same_content(items: Sequence[str | None], reference: Sequence[str | None]) -> dict[int, list[int]]:
    """Index of each item whose hash some reference shares -> the indices of those references
    (None, an unknown hash, matches nothing)."""
    where: dict[str, list[int]] = {}
    for j, digest in enumerate(reference):
        if digest is not None:
            where.setdefault(digest, []).append(j)
    return {i: where[digest] for i, digest in enumerate(items) if digest in where}


def find_copies(
    paths: Sequence[str], reference: Sequence[str], cache_dir: str | Path | None, show_progress: bool = False
) -> dict[int, list[int]]:
    """Which of ``paths`` hold the same bytes as some ``reference`` files: index -> reference indices.

    Only files whose byte count a file on the other side shares can be copies, so only those are
    hashed (through the hash cache): a first run reads few files, a later one none. A file that
    cannot be read now is nobody's copy.
    """
    keys, ref_keys = _keys(paths), _keys(reference)
    shared = {k[1] for k in keys if k} & {k[1] for k in ref_keys if k}
    digests, _, _ = hash_files([k for k in (*keys, *ref_keys) if k and k[1] in shared], cache_dir, show_progress)
    return same_content([digests.get(k) for k in keys], [digests.get(k) for k in ref_keys])


def _keys(paths: Sequence[str]) -> list[FileKey | None]:
    keys = []
    for p in paths:
        try:
            keys.append(file_key(p))
        except OSError as exc:
            log.warning("%s cannot be read (%s); it is not checked for copies", p, exc.strerror or exc)
            keys.append(None)
    return keys


def _load(path: Path | None) -> dict[str, tuple[int, int, str]]:
    """The hash cache as {path: (size, mtime_ns, sha256)}; a damaged one is ignored with a warning
    (its files are hashed again), never an error."""
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("version") != HASHES_VERSION:
            return {}
        records = {p: (int(size), int(mtime), str(digest)) for p, (size, mtime, digest) in doc["files"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("hash cache %s ignored, its files are hashed again: %s: %s", path, type(exc).__name__, exc)
        return {}
    return {p: r for p, r in records.items() if is_sha256(r[2])}


def _save(path: Path, new: dict[str, tuple[int, int, str]]) -> None:
    """Add ``new`` to the hash cache on disk (merged with what another process may have written
    meanwhile; replaced atomically, so a reader never sees half a file)."""
    records = {**_load(path), **new}
    doc = {"version": HASHES_VERSION, "files": {p: list(r) for p, r in sorted(records.items())}}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache folder costs time on the next run, nothing else
        log.warning("hash cache %s not written (%s); those files are hashed again next time", path, exc)
        tmp.unlink(missing_ok=True)
