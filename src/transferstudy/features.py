"""Frozen-activation cache: compute the frozen part of the network once, reuse it everywhere.

For unfreeze depth ``k`` the bottom ``5 - k`` stages are frozen (eval-mode batch norm, no
gradients), so their output is a fixed function of the input image. Every trial trains on the
study's ``V`` fixed views of each image (``images.batches.Views``: centre, mirror, seeded crops;
epoch ``e`` on view ``(e - 1) mod V``), cached or not; this module keeps the frozen output of
those views for every pool image, instead of recomputing it every epoch of every trial.

A view is built the first time an epoch (or a validation pass) needs it, in one pass over the
pool: so the first trial of a depth costs about what it would without the cache, and every
later epoch or trial that comes back to a view skips the frozen stages. A view's pixels do not
depend on how the pass batches or orders the images, so a trial without the cache (depth 5, a
cache that does not fit, ``feature_memory_fraction = 0``) trains on the same inputs.

A cache is keyed by what determines its content (``FeatureStore.key``): the dataset, a hash of
the frozen weights' values, the resolution, the depth, the views, and how the activations were
computed and stored (device type, dtype, torch version); anything else computes it again.

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
from .images.batches import DeviceData, Views
from .images.cache import sampled_checksum
from .model import TransferNet

log = logging.getLogger(__name__)

#: Images per forward pass while building a cache.
BUILD_BATCH = 128
#: What a saved depth-0 file holds: views (V, N, 2048), the N cache rows, V built flags, the
#: views' ``sampled_checksum``, and the cache key it was made for (also its name).
SAVED_KEYS = ("views", "rows", "built", "checksum", "key")


@dataclass
class FeatureCache:
    """Frozen-stage outputs of the study's pool rows for ``V`` views, each view built on first use.

    Attributes:
        views: ``(V, N, ...)`` activations; row ``position[r]`` belongs to cache row ``r``.
        position: ``(num_rows,)`` long tensor on the views' device, -1 where a row is absent.
        rows: the cache rows covered (every pool image), in build order.
        built: which views hold activations already.
        depth: the unfreeze depth whose frozen stages produce it.
        regime: the views whose activations it holds.
        key: ``FeatureStore.key`` of its content.
        build_seconds: time spent building views so far.
    """

    views: torch.Tensor
    position: torch.Tensor
    rows: np.ndarray
    built: list[bool]
    depth: int
    regime: Views
    key: str = ""
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
        for start, rows in zip(range(0, len(self.rows), BUILD_BATCH), data.batch_rows(self.rows, BUILD_BATCH)):
            h = self.regime.inputs(data, rows, view).contiguous(memory_format=runtime.memory_format(device))
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
    """Shape of one image's output of the stages frozen at ``depth``, by a dry run of ``model``
    on one blank image (batch-norm statistics untouched). The shape is ResNet-50's, whatever
    the weights: found once per image size and depth."""
    key = (image_size, depth)
    if key not in _SHAPES:
        weight = next(model.parameters())
        probe = torch.zeros(1, 3, image_size, image_size, device=weight.device, dtype=weight.dtype)
        was_training = model.training
        model.eval()
        _SHAPES[key] = tuple(model.frozen_features(probe, depth).shape[1:])
        model.train(was_training)
    return _SHAPES[key]


_SHAPES: dict[tuple[int, int], tuple[int, ...]] = {}


def estimate_bytes(
    model: TransferNet, depth: int, image_size: int, num_images: int, num_views: int, dtype: torch.dtype
) -> int:
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


def storage_dtype(device: torch.device, model: TransferNet) -> torch.dtype:
    """bf16 on CUDA (half the memory; the trainable stages run in bf16 there anyway); elsewhere
    the model's own dtype (fp32; fp64 in tests), so the cache holds what the frozen stages computed."""
    return torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype


def placement_name(features: FeatureCache | None) -> str:
    """Where a trial's frozen activations came from: ``gpu`` or ``host`` memory, or ``none``
    (the frozen stages ran on every batch)."""
    if features is None:
        return "none"
    return "gpu" if features.views.device.type == "cuda" else "host"


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state_dict's names, dtypes, shapes and values: which frozen weights a cache
    holds the output of, whatever file or name they came from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:20]


def allocate_feature_cache(
    model: TransferNet,
    depth: int,
    rows: np.ndarray,
    num_rows: int,
    regime: Views,
    device: torch.device,
    placement: torch.device,
    image_size: int,
    key: str = "",
) -> FeatureCache:
    """Reserve the memory of the cache of ``depth``; views are built as training first needs them."""
    shape = activation_shape(model, image_size, depth)
    views = torch.empty((regime.count, len(rows), *shape), dtype=storage_dtype(device, model), device=placement)
    if placement.type == "cpu" and device.type == "cuda":
        views = views.pin_memory()
    position = torch.full((num_rows,), -1, dtype=torch.long)
    position[torch.as_tensor(rows)] = torch.arange(len(rows))
    return FeatureCache(views, position.to(placement), np.asarray(rows), [False] * regime.count, depth, regime, key)


class FeatureStore:
    """The caches of one process (a study worker) for one regime, keyed by what determines
    their content.

    A cache for depth ``k`` comes with caches for the deeper depths ``k+1..4`` when they fit:
    building a view of ``k`` passes through their frozen outputs, so it fills them too, and
    their first trials start warm. When a cache does not fit, the least recently used others
    are dropped first. Depth-0 caches are also written to ``disk_dir`` (``save``) so later
    runs reuse them.

    Args:
        key_prefix: what fixes the images and the frozen weights (dataset fingerprint, a
            ``weights_digest``); part of every ``key``.
        regime: the views every cache holds.
        memory_fraction: the largest share of free GPU (or host) memory a cache may take; 0 = none.
    """

    def __init__(self, key_prefix: str, regime: Views, memory_fraction: float, disk_dir: str | Path | None = None):
        self.key_prefix, self.regime, self.memory_fraction = key_prefix, regime, memory_fraction
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self._caches: dict[int, FeatureCache] = {}
        self._saved: dict[int, list[bool]] = {}

    def key(self, depth: int, image_size: int, dtype: torch.dtype, device: torch.device) -> str:
        """A hash of everything a cache's activations depend on: the images and frozen weights
        (``key_prefix``), the resolution, the depth, the views, the stored dtype, and where and
        by which torch the frozen stages ran."""
        text = (
            f"{self.key_prefix}|{image_size}|{depth}|{self.regime.key()}|{dtype}|{device.type}"
            f"|torch {torch.__version__}"
        )
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _model_key(self, model: TransferNet, depth: int, data: DeviceData, device: torch.device) -> str:
        return self.key(depth, data.images.shape[1], storage_dtype(device, model), device)

    def get(self, model: TransferNet, data: DeviceData, rows: np.ndarray, device: torch.device) -> FeatureCache | None:
        """The cache for the model's depth (views are built as training needs them); None at
        depth 5, where nothing is frozen, with ``memory_fraction`` 0, or when the cache does not fit."""
        depth = model.unfreeze_depth
        if depth == 5 or self.memory_fraction <= 0:
            return None
        if depth not in self._caches:
            cache = self._load(model, depth, data, rows, device) or self._allocate(
                model, depth, data, rows, device, evict=True
            )
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
        nbytes = estimate_bytes(model, depth, image_size, len(rows), self.regime.count, storage_dtype(device, model))
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
            depth,
            len(rows),
            self.regime.count,
            nbytes / 1e9,
            placement,
        )
        key = self._model_key(model, depth, data, device)
        return allocate_feature_cache(
            model, depth, rows, len(data.labels), self.regime, device, placement, image_size, key
        )

    def _path(self, depth: int, key: str) -> Path | None:
        return self.disk_dir / f"features-{key}.pt" if self.disk_dir and depth == 0 else None

    def save(self, cache: FeatureCache | None) -> None:
        """Write a depth-0 cache's built views to disk (when a disk folder is set and they changed)."""
        path = self._path(cache.depth, cache.key) if cache is not None else None
        if path is None or not any(cache.built) or self._saved.get(cache.depth) == cache.built:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        views = cache.views.cpu()
        rows = torch.as_tensor(cache.rows)
        saved = {
            "views": views,
            "rows": rows,
            "built": list(cache.built),
            "checksum": _checksum(views),
            "key": cache.key,
        }
        torch.save(saved, tmp)
        tmp.replace(path)
        self._saved[cache.depth] = list(cache.built)

    def _load(self, model, depth: int, data, rows, device) -> FeatureCache | None:
        """The depth-0 cache saved by an earlier run, if its file holds what it claims; a torn or
        inconsistent file is reported, removed and computed again."""
        image_size = data.images.shape[1]
        key = self._model_key(model, depth, data, device)
        path = self._path(depth, key)
        if path is None or not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            problem = _saved_problem(saved, self.regime.count, activation_shape(model, image_size, depth), key)
        except Exception as exc:  # a torn or foreign file: torch.load raises many kinds
            problem = f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())})"
        if problem:
            log.warning("feature cache %s cannot be used, removed and computed again: %s", path, problem)
            path.unlink(missing_ok=True)
            return None
        if not torch.equal(saved["rows"], torch.as_tensor(rows)):
            return None  # made for another pool (other holdout): computed again and overwritten
        placement = choose_placement(
            saved["views"].numel() * saved["views"].element_size(), device, self.memory_fraction
        )
        if placement is None:
            return None
        cache = allocate_feature_cache(
            model, depth, rows, len(data.labels), self.regime, device, placement, image_size, key
        )
        cache.views.copy_(saved["views"])
        cache.built = list(saved["built"])
        self._saved[cache.depth] = list(cache.built)
        log.info(
            "frozen-activation cache for depth 0 loaded from %s (%d of %d views built)",
            path,
            sum(cache.built),
            self.regime.count,
        )
        return cache


def _checksum(views: torch.Tensor) -> str:
    return sampled_checksum(views.contiguous().view(-1).view(torch.uint8).numpy())


def _saved_problem(saved, num_views: int, per_image: tuple[int, ...], key: str) -> str | None:
    """Why a loaded depth-0 file does not hold what it claims (None = it does): activations made
    for ``key``, ``num_views`` views of ``per_image`` activations for each of its rows, as many
    built flags, and views that match their checksum."""
    if not isinstance(saved, dict):
        return f"holds a {type(saved).__name__}, not a dict"
    missing = [k for k in SAVED_KEYS if k not in saved]
    if missing:
        return f"lacks {', '.join(missing)} (damaged, or written by an older version)"
    if saved["key"] != key:
        return f"made for cache key {saved['key']!r}, not {key!r}"
    views, rows, built = saved["views"], saved["rows"], saved["built"]
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1:
        return "rows is not a list of cache rows"
    shape = (num_views, len(rows), *per_image)
    if not isinstance(views, torch.Tensor) or tuple(views.shape) != shape:
        return f"views of shape {tuple(getattr(views, 'shape', ()))}, expected {shape}"
    if not isinstance(built, list) or len(built) != num_views or not all(isinstance(b, bool) for b in built):
        return f"built flags {built!r} do not describe {num_views} views"
    if _checksum(views) != saved["checksum"]:
        return "views do not match their checksum"
    return None
