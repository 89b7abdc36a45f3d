"""Device batches: the decoded images placed once on the training device, cut into
normalised batches and augmented there (random-resized crop + flip in one ``grid_sample``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainSection
from .cache import ImageCache

log = logging.getLogger(__name__)

#: ImageNet channel statistics used by every torchvision ResNet-50 checkpoint.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    @classmethod
    def from_settings(cls, s: TrainSection) -> Augment:
        """The augmentation that ``[train]`` (``augment``, ``crop_scale_min``) asks for."""
        return cls(crop_scale=(s.crop_scale_min, 1.0), enabled=s.augment)


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
