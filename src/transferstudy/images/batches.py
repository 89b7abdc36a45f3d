"""Device batches: the decoded images placed once on the training device, cut into
normalised batches and augmented there (random-resized crop + flip in one ``grid_sample``),
and the training regime's fixed views of every image (``Views``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainSection
from .cache import ImageCache

log = logging.getLogger(__name__)

#: ImageNet channel statistics used by every torchvision ResNet-50 checkpoint.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
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

    @classmethod
    def from_settings(cls, s: TrainSection) -> Augment:
        """The augmentation that ``[train]`` (``augment``, ``crop_scale_min``) asks for."""
        return cls(crop_scale=(s.crop_scale_min, 1.0), enabled=s.augment)


def normalize(batch_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, S, S)`` ``dtype`` normalised with ImageNet statistics.

    The permuted view of NHWC data is already channels_last in memory, which is what the
    CUDA convolutions prefer.
    """
    x = batch_u8.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Fresh random-resized crops and flips of a normalised batch, drawn from ``generator``
    (training uses ``Views``, whose crops are fixed per image)."""
    if not aug.enabled:
        return x
    return crop_batch(x, aug, torch.rand(x.shape[0], 5, generator=generator, device=generator.device))


def crop_batch(x: torch.Tensor, aug: Augment, draws: torch.Tensor) -> torch.Tensor:
    """Random-resized crop and horizontal flip of a normalised batch, in one ``grid_sample``.

    Image ``i`` is cut as its five uniform draws ``draws[i]`` in [0, 1) say (area, aspect ratio,
    centre x and y, flip), and its sampling grid is written out per pixel (no batched matrix
    product): so its output is the same arithmetic whatever else the batch holds.
    """
    r = draws.to(x.device, x.dtype)
    lo, hi = aug.crop_scale
    area = lo + (hi - lo) * r[:, 0]
    log_lo, log_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * r[:, 1])
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * r[:, 2] - 1)
    cy = (1 - h) * (2 * r[:, 3] - 1)
    flip = 1 - 2 * (r[:, 4] < 0.5).to(x.dtype) if aug.hflip else torch.ones_like(w)
    height, width = x.shape[-2:]
    # Pixel centres in [-1, 1], as affine_grid places them with align_corners=False.
    xs = (2 * torch.arange(width, device=x.device, dtype=x.dtype) + 1) / width - 1
    ys = (2 * torch.arange(height, device=x.device, dtype=x.dtype) + 1) / height - 1
    gx = (w * flip)[:, None, None] * xs[None, None, :] + cx[:, None, None]
    gy = h[:, None, None] * ys[None, :, None] + cy[:, None, None]
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class DeviceData:
    """The images and labels of one cache, placed once where training will read them.

    On CUDA the uint8 array is copied into GPU memory when it fits ``max_gpu_fraction`` of the
    free memory, otherwise into pinned host memory; on CPU it stays in host memory. Batches
    come out as ``dtype`` (float32 for training; float64 lets tests compare two computations
    without fp32 rounding).
    """

    def __init__(
        self, cache: ImageCache, device: torch.device, max_gpu_fraction: float = 0.5, dtype: torch.dtype = torch.float32
    ):
        self.device, self.dtype = device, dtype
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
        return normalize(self.images.index_select(0, rows).to(self.device, non_blocking=True), self.dtype)

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        """Labels of ``rows`` on the training device."""
        return self.labels.index_select(0, rows.to(self.labels.device)).to(self.device, non_blocking=True)


#: How a view is computed from its image; part of the frozen-activation cache key (``Views.key``),
#: so activations saved by code that made other views are never reused. Bump it when that changes.
VIEWS_VERSION = 2


@dataclass(frozen=True)
class Views:
    """The training regime: ``count`` fixed views of every image, cycled over the epochs.

        view 0      the centre view (also what validation uses)
        view 1      its horizontal mirror
        view 2..V-1 random-resized crops (with random flips)

    Epoch ``e`` trains on view ``(e - 1) mod V``; without augmentation V = 1 (the centre view).
    A crop view of an image is a function of (its cache row, the view, ``seed``) alone: its five
    draws come from a random stream seeded by (seed, view) over every row of the image cache,
    looked up by row, never from a stream consumed in batch order. So a view is the same built
    for the frozen-activation cache (in batches of any size, in any order) or on the fly for a
    training batch that runs the whole network: the cache is a pure speed-up.

    Attributes:
        count: V, views per image (>= 1).
        aug: the crops' area and aspect-ratio ranges and flips; ``enabled`` False means V = 1.
        seed: seeds the crop views (a study's ``[train] train_seed``).
    """

    count: int
    aug: Augment
    seed: int
    #: Per (view, rows, device, dtype): the crop draws of every cache row, drawn once.
    _draws: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.count < 1 or (self.count > 1 and not self.aug.enabled):
            raise ValueError(
                f"{self.count} views with augmentation {'on' if self.aug.enabled else 'off'}: expected 1 without, >= 1 with"
            )

    @classmethod
    def from_settings(cls, s: TrainSection, seed: int | None = None) -> Views:
        """The regime ``[train]`` asks for (``feature_views``, ``augment``, ``crop_scale_min``),
        its crops seeded by ``seed`` (default: ``s.train_seed``)."""
        aug = Augment.from_settings(s)
        return cls(s.feature_views if aug.enabled else 1, aug, s.train_seed if seed is None else seed)

    def for_epoch(self, epoch: int) -> int:
        """Epoch 1 uses the centre view, epoch 2 the mirror, then the crops, cycling."""
        return (epoch - 1) % self.count

    def inputs(self, data: DeviceData, rows: torch.Tensor, view: int) -> torch.Tensor:
        """View ``view`` of the images of ``rows`` (from ``DeviceData.batch_rows``), normalised, on
        the training device."""
        x = data.inputs(rows)
        if view == 0:
            return x
        if view == 1:
            return x.flip(-1)
        draws = self._crop_draws(view, len(data.labels), x.device, x.dtype)
        return crop_batch(x, self.aug, draws.index_select(0, rows.to(x.device)))

    def _crop_draws(self, view: int, num_rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (view, num_rows, str(device), dtype)
        if key not in self._draws:
            rng = np.random.default_rng([self.seed % 2**64, view])
            self._draws[key] = torch.from_numpy(rng.random((num_rows, 5))).to(device, dtype)
        return self._draws[key]

    def describe(self) -> dict:
        """The regime as plain values (a trial and study attr)."""
        return {
            "views": self.count,
            "augment": self.aug.enabled,
            "crop_scale": list(self.aug.crop_scale),
            "crop_ratio": list(self.aug.crop_ratio),
            "hflip": self.aug.hflip,
            "seed": self.seed,
        }

    def key(self) -> str:
        """What fixes the views' pixels, as text for cache keys."""
        return f"views v{VIEWS_VERSION} {self!r}"
