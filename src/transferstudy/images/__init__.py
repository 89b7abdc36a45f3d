"""Images: decode once (``decode``), cache on disk (``cache``), batch and augment on the device
(``batches``)."""

from .batches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    DeviceData,
    Views,
    augment_batch,
    crop_batch,
    normalize,
)
from .cache import ImageCache, check_classes, dataset_fingerprint, load_cache
from .decode import ImageProblem, decode_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Augment",
    "DeviceData",
    "ImageCache",
    "ImageProblem",
    "Views",
    "augment_batch",
    "check_classes",
    "crop_batch",
    "dataset_fingerprint",
    "decode_image",
    "load_cache",
    "normalize",
]
