"""Frozen-activation cache: compute the frozen part of the network once, reuse it everywhere.

For unfreeze depth ``k`` the bottom ``5 - k`` stages are frozen (eval-mode batch norm, no
gradients), so their output is a fixed function of the input image. Instead of recomputing
it every epoch of every trial, it is computed once per (dataset, weights, resolution, depth,
views) for ``V`` fixed views of each image and reused:

    view 0      the centre view (also what validation uses)
    view 1      its horizontal mirror
    view 2..V-1 seeded random-resized crops (with random flips)

Each training epoch draws one view per image, so augmentation comes from a fixed pool of V
views instead of fresh random crops: the price of not running the frozen stages again. With
V = 1 and augmentation off, cached and uncached training compute the same thing.

Depth 0 caches the pooled 2048-d features (tiny; also kept on disk across runs); deeper
settings cache feature maps, whose size is computed before anything is built: they live on
the GPU when they fit the allowed share of free memory, else in (pinned) host memory, else
the cache is skipped and training runs the frozen stages as usual.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .data import Augment, DeviceData, augment_batch
from .model import TransferNet

log = logging.getLogger(__name__)

#: Images per forward pass while building a cache.
BUILD_BATCH = 128


@dataclass
class FeatureCache:
    """Cached frozen-stage outputs of some cache rows, for ``V`` views.

    Attributes:
        views: ``(V, N, ...)`` activations; row ``position[r]`` belongs to cache row ``r``.
        position: ``(num_rows,)`` long tensor on the views' device, -1 where a row is absent.
        depth: the unfreeze depth whose frozen stages produced it.
        build_seconds: how long building took (0 when loaded from disk).
    """

    views: torch.Tensor
    position: torch.Tensor
    depth: int
    build_seconds: float = 0.0

    @property
    def num_views(self) -> int:
        return self.views.shape[0]

    @property
    def nbytes(self) -> int:
        return self.views.numel() * self.views.element_size()

    def take(self, rows: torch.Tensor, view: torch.Tensor | int, device: torch.device) -> torch.Tensor:
        """Activations of cache ``rows`` (one view each, or the same view for all) on ``device``."""
        pos = self.position[rows.to(self.position.device)]
        if isinstance(view, int):
            out = self.views[view].index_select(0, pos)
        else:
            out = self.views[view.to(self.views.device), pos]
        return out.to(device, non_blocking=True)


def activation_shape(model: TransferNet, image_size: int) -> tuple[int, ...]:
    """Shape of one image's frozen-stage output, found by a dry run on one blank image."""
    probe = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        shape = tuple(model.frozen_features(probe).shape[1:])
    model.train(was_training)
    return shape


def estimate_bytes(model: TransferNet, image_size: int, num_images: int, num_views: int, dtype: torch.dtype) -> int:
    """Memory the cache will take, computed before it is built."""
    per_image = int(np.prod(activation_shape(model, image_size)))
    return per_image * num_images * num_views * torch.tensor([], dtype=dtype).element_size()


def available_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_placement(nbytes: int, device: torch.device, memory_fraction: float) -> torch.device | None:
    """GPU when it fits ``memory_fraction`` of free GPU memory, else host memory, else None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= memory_fraction * free:
            return device
    if nbytes <= memory_fraction * available_host_bytes():
        return torch.device("cpu")
    return None


def storage_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (half the memory; the trainable stages run in bf16 there anyway), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _view(x: torch.Tensor, v: int, aug: Augment, seed: int) -> torch.Tensor:
    if v == 0:
        return x
    if v == 1:
        return x.flip(-1)
    gen = runtime.generator(seed * 1000 + v, x.device)
    return augment_batch(x, aug, gen)


@torch.no_grad()
def build_feature_cache(
    model: TransferNet,
    data: DeviceData,
    rows: np.ndarray,
    num_views: int,
    aug: Augment,
    seed: int,
    device: torch.device,
    placement: torch.device,
) -> FeatureCache:
    """Run the frozen stages over ``rows`` once per view and keep the outputs on ``placement``."""
    started = time.perf_counter()
    model.eval()
    dtype = storage_dtype(device)
    shape = activation_shape(model, data.images.shape[1])
    views = torch.empty((num_views, len(rows), *shape), dtype=dtype, device=placement)
    if placement.type == "cpu" and device.type == "cuda":
        views = views.pin_memory()
    for v in range(num_views):
        for start in range(0, len(rows), BUILD_BATCH):
            x, _ = next(data.batches(rows[start : start + BUILD_BATCH], BUILD_BATCH))
            x = _view(x, v, aug, seed).contiguous(memory_format=runtime.memory_format(device))
            with runtime.autocast(device):
                h = model.frozen_features(x)
            views[v, start : start + len(h)] = h.to(placement, dtype=dtype)
    position = torch.full((len(data.labels),), -1, dtype=torch.long)
    position[torch.as_tensor(rows)] = torch.arange(len(rows))
    runtime.synchronize(device)
    return FeatureCache(views, position.to(placement), model.unfreeze_depth, time.perf_counter() - started)


class FeatureStore:
    """The caches of one process (a study worker), keyed by what determines their content.

    Holds at most ``max_entries`` caches in memory (the least recently used goes first);
    depth-0 caches are also written to ``disk_dir`` so later runs skip building them.
    """

    def __init__(self, key_prefix: str, num_views: int, aug: Augment, seed: int, memory_fraction: float,
                 disk_dir: str | Path | None = None, max_entries: int = 2):
        self.key_prefix, self.num_views, self.aug, self.seed = key_prefix, num_views, aug, seed
        self.memory_fraction, self.max_entries = memory_fraction, max_entries
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._caches: dict[int, FeatureCache | None] = {}

    def key(self, depth: int, image_size: int) -> str:
        text = f"{self.key_prefix}|{image_size}|{depth}|{self.num_views}|{self.aug}|{self.seed}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def get(self, model: TransferNet, data: DeviceData, rows: np.ndarray, device: torch.device) -> FeatureCache | None:
        """The cache for the model's depth, built on first use; None when depth 5 or it does not fit."""
        depth = model.unfreeze_depth
        if depth == 5 or self.num_views < 1:
            return None
        if depth in self._caches:
            self._caches[depth] = self._caches.pop(depth)  # most recently used last
            return self._caches[depth]
        cache = self._load(depth, data, rows, device) or self._build(model, data, rows, device)
        while len(self._caches) >= self.max_entries:
            self._caches.pop(next(iter(self._caches)))
            runtime.release_memory(device)
        self._caches[depth] = cache
        return cache

    def _build(self, model, data, rows, device) -> FeatureCache | None:
        dtype = storage_dtype(device)
        nbytes = estimate_bytes(model, data.images.shape[1], len(rows), self.num_views, dtype)
        for depth in [d for d in self._caches if d != model.unfreeze_depth]:
            self._caches.pop(depth)  # make room before measuring what is free
        runtime.release_memory(device)
        placement = choose_placement(nbytes, device, self.memory_fraction)
        if placement is None:
            log.info("frozen-activation cache for depth %d skipped: %.2f GB does not fit", model.unfreeze_depth, nbytes / 1e9)
            return None
        cache = build_feature_cache(model, data, rows, self.num_views, self.aug, self.seed, device, placement)
        log.info(
            "frozen-activation cache for depth %d: %d images x %d views, %.2f GB on %s, built in %.1f s",
            model.unfreeze_depth, len(rows), self.num_views, nbytes / 1e9, placement, cache.build_seconds,
        )
        if model.unfreeze_depth == 0 and self.disk_dir is not None:
            self._save(cache, data, rows)
        return cache

    def _path(self, depth: int, image_size: int) -> Path | None:
        return self.disk_dir / f"features-{self.key(depth, image_size)}.pt" if self.disk_dir else None

    def _save(self, cache: FeatureCache, data: DeviceData, rows: np.ndarray) -> None:
        path = self._path(0, data.images.shape[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"views": cache.views.cpu(), "rows": torch.as_tensor(rows)}, tmp)
        tmp.replace(path)

    def _load(self, depth: int, data: DeviceData, rows: np.ndarray, device: torch.device) -> FeatureCache | None:
        path = self._path(depth, data.images.shape[1]) if depth == 0 else None
        if path is None or not path.is_file():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not torch.equal(saved["rows"], torch.as_tensor(rows)):
            return None
        placement = choose_placement(saved["views"].numel() * saved["views"].element_size(), device, self.memory_fraction)
        if placement is None:
            return None
        position = torch.full((len(data.labels),), -1, dtype=torch.long)
        position[saved["rows"]] = torch.arange(len(rows))
        log.info("frozen-activation cache for depth 0 loaded from %s", path)
        return FeatureCache(saved["views"].to(placement), position.to(placement), 0)
