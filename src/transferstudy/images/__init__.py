"""Images: decode once (``decode``), cache on disk (``cache``), batch and augment on the device
(``batches``)."""

from .batches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    DeviceData,
    augment_batch,
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
    "augment_batch",
    "check_classes",
    "dataset_fingerprint",
    "decode_image",
    "load_cache",
    "normalize",
]
