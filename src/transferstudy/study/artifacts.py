"""A study's files in Optuna's artifact store: trial checkpoints, ``best.pt``, the exported model, the report.

Workers on other machines write their trials' checkpoints here, and the parent reads them back
to score the holdout, so nothing depends on which machine ran a trial. The store is
``[study] artifact_store``: a folder (default ``<output_dir>/<name>/artifacts``; shared storage
such as NFS for several machines) or ``s3://bucket`` (any S3-compatible service through boto3;
``AWS_ENDPOINT_URL`` and the usual AWS variables say where and who). optuna-dashboard shows
the files with ``--artifact-dir`` pointing at the same folder.

A trial's checkpoint is a trial artifact, its id in the trial attr ``checkpoint_artifact``. The
exported ``model/*`` and ``report.html`` are study artifacts; the study attr ``files`` maps each
name to its current artifact id (a new version replaces the old one), and ``best.pt`` to the
best trial's checkpoint artifact.
A worker removes only the checkpoints of trials it ran itself (``objective``); the rest is the
parent's once-per-study work (``holdout``).

With a folder store, a file of the results folder and its artifact are one file on disk (a hard
link, where the filesystem allows one): ``best.pt`` and the exported model cost their size
once. Whatever writes those files therefore replaces them (write aside, then rename), never
rewrites them in place, which would change the stored artifact too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from ..config import StudyConfig
from . import attrs

log = logging.getLogger(__name__)


def store_location(cfg: StudyConfig) -> str:
    """Where the study's artifacts live: ``s3://bucket`` or a folder path."""
    return cfg.study.artifact_store or str(cfg.result_dir / "artifacts")


def open_store(cfg: StudyConfig):
    """The study's artifact store (``store_location``).

    Raises:
        ValueError: an ``s3://`` location with a key prefix or without boto3 installed.
    """
    where = store_location(cfg)
    if where.startswith("s3://"):
        bucket = where.removeprefix("s3://").strip("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"study.artifact_store = {where!r}: give a bucket only (s3://bucket), without a prefix")
        try:
            from optuna.artifacts import Boto3ArtifactStore

            return Boto3ArtifactStore(bucket)
        except ImportError as exc:
            raise ValueError(f"study.artifact_store = {where!r} needs boto3 (pip install boto3): {exc}") from None
    folder = Path(where).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(folder)


def put_trial_file(trial: optuna.Trial, store, path: Path) -> str:
    """Upload ``path`` as an artifact of the running ``trial``; returns its artifact id."""
    return upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)


def fetch(store, artifact_id: str, dest: Path) -> Path:
    """Download an artifact to ``dest`` (replacing it); from a folder store on the same
    filesystem, ``dest`` becomes a hard link to it instead of a copy.

    Raises:
        FileNotFoundError: the store has no such artifact (the message names the store and id).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = _local_file(store, artifact_id)
    if local is not None and _link(local, dest):  # a missing artifact fails here too, and below
        return dest
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        download_artifact(artifact_store=store, file_path=str(partial), artifact_id=artifact_id)
    except ArtifactNotFound:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(f"artifact {artifact_id} is not in the artifact store {_describe(store)}") from None
    partial.replace(dest)
    return dest


def remove(store, artifact_id: str | None) -> None:
    """Remove an artifact from the store; an id that is already gone is fine."""
    if not artifact_id:
        return
    with contextlib.suppress(ArtifactNotFound):
        store.remove(artifact_id)


def checkpoint_id(trial: optuna.trial.FrozenTrial) -> str | None:
    """The artifact id of a trial's checkpoint, if one was kept."""
    return trial.user_attrs.get(attrs.TRIAL_CHECKPOINT)


def load_trial_checkpoint(store, trial: optuna.trial.FrozenTrial, device):
    """The model of a trial's kept checkpoint, read from the artifact store (whichever machine
    wrote it), or None when the trial kept none or its checkpoint was removed."""
    from ..model import load_checkpoint

    artifact_id = checkpoint_id(trial)
    if not artifact_id:
        return None
    local = _local_file(store, artifact_id)
    if local is not None:  # read where it lies
        return load_checkpoint(local, device)[0] if local.is_file() else None
    with tempfile.TemporaryDirectory(prefix="transferstudy-ckpt-") as tmp:
        try:
            path = fetch(store, artifact_id, Path(tmp) / f"trial_{trial.number:04d}.pt")
        except FileNotFoundError:
            return None
        model, _ = load_checkpoint(path, device)
    return model


def put_study_file(study: optuna.Study, store, path: Path, key: str | None = None) -> str:
    """Upload ``path`` as a study artifact, replacing the one stored before under ``key`` (default:
    its file name) in the study attr ``files``; returns the new artifact id."""
    key = key or Path(path).name
    files = dict(study.user_attrs.get(attrs.STUDY_FILES, {}))
    new = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study)
    local = _local_file(store, new)
    if local is not None:
        _link(local, Path(path))  # one copy on disk
    remove(store, files.get(key))
    files[key] = new
    study.set_user_attr(attrs.STUDY_FILES, files)
    return new


def put_study_files(study: optuna.Study, cfg: StudyConfig, paths: list[Path]) -> None:
    """``put_study_file`` for each path, named by its place under the results folder."""
    store = open_store(cfg)
    root = cfg.result_dir.resolve()
    for path in paths:
        path = Path(path).resolve()
        name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        put_study_file(study, store, path, name)
    log.info(
        "stored %d file(s) of study %r in the artifact store %s", len(paths), study.study_name, store_location(cfg)
    )


def _local_file(store, artifact_id: str) -> Path | None:
    """Where a folder store keeps an artifact (None for other stores)."""
    if not isinstance(store, FileSystemArtifactStore):
        return None
    return Path(store._base_path) / artifact_id


def _link(src: Path, dest: Path) -> bool:
    """Make ``dest`` a second name of ``src`` (replacing ``dest`` in one rename); False where the
    filesystem has no hard links or they are on different filesystems (the caller copies)."""
    tmp = dest.with_name(dest.name + ".link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        return False
    tmp.replace(dest)
    return True


def _describe(store) -> str:
    base = getattr(store, "_base_path", None)
    return str(base) if base is not None else f"s3://{getattr(store, 'bucket', '?')}"
