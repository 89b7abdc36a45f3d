"""Frozen-activation cache: compute the frozen part of the network once, reuse it everywhere.

For unfreeze depth ``k`` the bottom ``5 - k`` stages are frozen (eval-mode batch norm, no
gradients), so their output is a fixed function of the input image. Instead of recomputing
it every epoch of every trial, it is kept per (dataset, weights, resolution, depth, views)
for ``V`` fixed views of every pool image and reused:

    view 0      the centre view (also what validation uses)
    view 1      its horizontal mirror
    view 2..V-1 seeded random-resized crops (with random flips)

Training epoch ``e`` uses view ``(e - 1) mod V``, and a view is built the first time an
epoch (or a validation pass) needs it, in one pass over the pool: so the first trial of a
depth costs about what it would without the cache, and every later epoch or trial that
comes back to a view skips the frozen stages. Augmentation thus comes from a fixed pool of V
views instead of fresh crops every epoch: the price of not running the frozen stages again.
With V = 1 and augmentation off, cached and uncached training compute the same thing.

The frozen output of a deeper depth ``k' > k`` (fewer frozen stages) is an intermediate
result of depth ``k``'s frozen pass, so building a view for ``k`` also fills that view for
every deeper depth whose cache fits: a study that starts with head-only trials finds the
later depths' caches already warm.

Depth 0 caches the pooled 2048-d features (tiny; also kept on disk across runs); deeper
settings cache feature maps, whose size is computed before anything is allocated: they live
on the GPU when they fit the allowed share of free memory, else in (pinned) host memory,
else the cache is skipped and training runs the frozen stages as usual.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .images.batches import Augment, DeviceData, augment_batch
from .model import TransferNet

log = logging.getLogger(__name__)

#: Images per forward pass while building a cache.
BUILD_BATCH = 128


@dataclass
class FeatureCache:
    """Frozen-stage outputs of the study's pool rows for ``V`` views, each view built on first use.

    Attributes:
        views: ``(V, N, ...)`` activations; row ``position[r]`` belongs to cache row ``r``.
        position: ``(num_rows,)`` long tensor on the views' device, -1 where a row is absent.
        rows: the cache rows covered (every pool image), in build order.
        built: which views hold activations already.
        depth: the unfreeze depth whose frozen stages produce it.
        build_seconds: time spent building views so far.
    """

    views: torch.Tensor
    position: torch.Tensor
    rows: np.ndarray
    built: list[bool]
    depth: int
    aug: Augment
    seed: int
    build_seconds: float = 0.0
    #: Caches of deeper unfreeze depths, whose frozen output this cache's pass computes on the
    #: way (depth k' > k stops after stage 5 - k'); filled by the same pass when given.
    siblings: Callable[[], list[FeatureCache]] | None = None

    @property
    def num_views(self) -> int:
        return self.views.shape[0]

    @property
    def nbytes(self) -> int:
        return self.views.numel() * self.views.element_size()

    def view_for_epoch(self, epoch: int) -> int:
        """Epoch 1 uses the centre view, epoch 2 the mirror, then the crops, cycling."""
        return (epoch - 1) % self.num_views

    def take(self, rows: torch.Tensor, view: int, device: torch.device) -> torch.Tensor:
        """Activations of cache ``rows`` for one view, on ``device``."""
        pos = self.position[rows.to(self.position.device)]
        return self.views[view].index_select(0, pos).to(device, non_blocking=True)

    @torch.no_grad()
    def ensure_view(self, view: int, model: TransferNet, data: DeviceData, device: torch.device) -> None:
        """Run the frozen stages over every covered row for ``view``, unless already done.

        The same pass also fills ``view`` of every sibling cache that lacks it: their frozen
        outputs are this pass's intermediate results.
        """
        if self.built[view]:
            return
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        also = {5 - c.depth: c for c in (self.siblings() if self.siblings else []) if not c.built[view]}
        gen = runtime.generator(self.seed * 1000 + view, device)
        for start in range(0, len(self.rows), BUILD_BATCH):
            x, _ = next(data.batches(self.rows[start : start + BUILD_BATCH], BUILD_BATCH))
            h = _view(x, view, self.aug, gen).contiguous(memory_format=runtime.memory_format(device))
            with runtime.autocast(device):
                for done, stage in enumerate(model.stages[: model.num_frozen], start=1):
                    h = stage(h)
                    if done in also:
                        also[done].store(view, start, h)
                if self.depth == 0:
                    h = torch.flatten(model.pool(h), 1)
            self.store(view, start, h)
        model.train(was_training)
        runtime.synchronize(device)
        for cache in (self, *also.values()):
            cache.built[view] = True
        self.build_seconds += time.perf_counter() - started

    def store(self, view: int, start: int, h: torch.Tensor) -> None:
        self.views[view, start : start + len(h)] = h.to(self.views.device, dtype=self.views.dtype)


def activation_shape(model: TransferNet, image_size: int, depth: int) -> tuple[int, ...]:
    """Shape of one image's output of the stages frozen at ``depth``, by a dry run on one
    blank image (batch-norm statistics untouched)."""
    probe = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    shape = tuple(model.frozen_features(probe, depth).shape[1:])
    model.train(was_training)
    return shape


def estimate_bytes(model: TransferNet, depth: int, image_size: int, num_images: int, num_views: int, dtype: torch.dtype) -> int:
    """Memory the cache of ``depth`` will take, computed before it is built."""
    per_image = int(np.prod(activation_shape(model, image_size, depth)))
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


def _view(x: torch.Tensor, v: int, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    if v == 0:
        return x
    if v == 1:
        return x.flip(-1)
    return augment_batch(x, aug, gen)


def allocate_feature_cache(
    model: TransferNet, depth: int, rows: np.ndarray, num_rows: int, num_views: int, aug: Augment, seed: int,
    device: torch.device, placement: torch.device, image_size: int,
) -> FeatureCache:
    """Reserve the memory of the cache of ``depth``; views are built as training first needs them."""
    shape = activation_shape(model, image_size, depth)
    views = torch.empty((num_views, len(rows), *shape), dtype=storage_dtype(device), device=placement)
    if placement.type == "cpu" and device.type == "cuda":
        views = views.pin_memory()
    position = torch.full((num_rows,), -1, dtype=torch.long)
    position[torch.as_tensor(rows)] = torch.arange(len(rows))
    return FeatureCache(views, position.to(placement), np.asarray(rows), [False] * num_views, depth, aug, seed)


class FeatureStore:
    """The caches of one process (a study worker), keyed by what determines their content.

    A cache for depth ``k`` comes with caches for the deeper depths ``k+1..4`` when they fit:
    building a view of ``k`` passes through their frozen outputs, so it fills them too, and
    their first trials start warm. When a cache does not fit, the least recently used others
    are dropped first. Depth-0 caches are also written to ``disk_dir`` (``save``) so later
    runs reuse them.
    """

    def __init__(self, key_prefix: str, num_views: int, aug: Augment, seed: int, memory_fraction: float,
                 disk_dir: str | Path | None = None):
        self.key_prefix, self.num_views, self.aug, self.seed = key_prefix, num_views, aug, seed
        self.memory_fraction = memory_fraction
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._caches: dict[int, FeatureCache] = {}
        self._saved: dict[int, list[bool]] = {}

    def key(self, depth: int, image_size: int) -> str:
        text = f"{self.key_prefix}|{image_size}|{depth}|{self.num_views}|{self.aug}|{self.seed}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def get(self, model: TransferNet, data: DeviceData, rows: np.ndarray, device: torch.device) -> FeatureCache | None:
        """The cache for the model's depth (views are built as training needs them); None at
        depth 5, where nothing is frozen, or when the cache does not fit."""
        depth = model.unfreeze_depth
        if depth == 5 or self.num_views < 1:
            return None
        if depth not in self._caches:
            cache = self._load(model, depth, data, rows, device) or self._allocate(model, depth, data, rows, device, evict=True)
            if cache is None:
                return None
            self._add(depth, cache)
            for deeper in range(depth + 1, 5):
                self._add_sibling(model, deeper, data, rows, device)
        self._caches[depth] = self._caches.pop(depth)  # most recently used last
        return self._caches[depth]

    def _add(self, depth: int, cache: FeatureCache) -> None:
        cache.siblings = lambda: [c for d, c in self._caches.items() if d > depth]
        self._caches[depth] = cache

    def _add_sibling(self, model: TransferNet, depth: int, data, rows, device) -> None:
        if depth in self._caches:
            return
        cache = self._allocate(model, depth, data, rows, device, evict=False)
        if cache is not None:
            self._add(depth, cache)
            self._caches = {depth: self._caches.pop(depth), **self._caches}  # least recently used

    def _allocate(self, model, depth: int, data, rows, device, evict: bool) -> FeatureCache | None:
        image_size = data.images.shape[1]
        nbytes = estimate_bytes(model, depth, image_size, len(rows), self.num_views, storage_dtype(device))
        placement = choose_placement(nbytes, device, self.memory_fraction)
        while placement is None and evict and self._caches:
            self._caches.pop(next(iter(self._caches)))  # the least recently used goes first
            runtime.release_memory(device)
            placement = choose_placement(nbytes, device, self.memory_fraction)
        if placement is None:
            log.info("frozen-activation cache for depth %d skipped: %.2f GB does not fit", depth, nbytes / 1e9)
            return None
        log.info(
            "frozen-activation cache for depth %d: %d images x %d views, %.2f GB on %s",
            depth, len(rows), self.num_views, nbytes / 1e9, placement,
        )
        return allocate_feature_cache(model, depth, rows, len(data.labels), self.num_views, self.aug, self.seed, device, placement, image_size)

    def _path(self, depth: int, image_size: int) -> Path | None:
        return self.disk_dir / f"features-{self.key(depth, image_size)}.pt" if self.disk_dir and depth == 0 else None

    def save(self, cache: FeatureCache | None, image_size: int) -> None:
        """Write a depth-0 cache's built views to disk (when a disk folder is set and they changed)."""
        path = self._path(cache.depth, image_size) if cache is not None else None
        if path is None or not any(cache.built) or self._saved.get(cache.depth) == cache.built:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"views": cache.views.cpu(), "rows": torch.as_tensor(cache.rows), "built": list(cache.built)}, tmp)
        tmp.replace(path)
        self._saved[cache.depth] = list(cache.built)

    def _load(self, model, depth: int, data, rows, device) -> FeatureCache | None:
        path = self._path(depth, data.images.shape[1])
        if path is None or not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: rebuild instead
            log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
            return None
        if not torch.equal(saved["rows"], torch.as_tensor(rows)) or len(saved["built"]) != self.num_views:
            return None
        image_size = data.images.shape[1]
        placement = choose_placement(saved["views"].numel() * saved["views"].element_size(), device, self.memory_fraction)
        if placement is None:
            return None
        cache = allocate_feature_cache(model, depth, rows, len(data.labels), self.num_views, self.aug, self.seed, device, placement, image_size)
        cache.views.copy_(saved["views"])
        cache.built = list(saved["built"])
        self._saved[cache.depth] = list(cache.built)
        log.info("frozen-activation cache for depth 0 loaded from %s (%d of %d views built)", path, sum(cache.built), self.num_views)
        return cache
