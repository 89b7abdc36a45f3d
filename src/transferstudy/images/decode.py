"""Decoding: any image file into a uint8 RGB array at training resolution.

EXIF orientation is applied; grayscale, CMYK, palette, alpha and 16-bit images become 8-bit
RGB; files that cannot be used raise ``ImageProblem`` with the reason shown to the user.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

#: Largest image accepted, in pixels (about 16k x 11k); larger files are reported as
#: possible decompression bombs instead of being decoded.
MAX_IMAGE_PIXELS = 178_956_970


class ImageProblem(Exception):
    """A file that cannot be used as an image; str() is the reason shown to the user."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, alpha and 16-bit images become 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    if mode == "stretch":
        return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC)


def decode_image(
    path: str | Path,
    size: int,
    resize_mode: str = "center_crop",
    bbox: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Decode one file into a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied, the optional bounding box is cropped, and the image is
    resized (``center_crop``: shorter side to ``size`` then centre crop; ``stretch``: both
    sides to ``size``).

    Raises:
        ImageProblem: the file is empty, not an image, truncated, corrupt or too large.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageProblem("empty file (0 bytes)")
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (size * 2, size * 2))  # JPEG: decode at reduced scale when large
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"image too large (possible decompression bomb): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageProblem("not an image (format not recognised)") from None
    except OSError as exc:
        raise ImageProblem(f"unreadable or truncated image: {exc}") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise ImageProblem(f"corrupt image: {exc}") from None
    if bbox is not None:
        left, top, right, bottom = bbox
        box = (max(0, left), max(0, top), min(img.width, right), min(img.height, bottom))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ImageProblem(f"bounding box {bbox} lies outside the {img.width}x{img.height} image")
        img = img.crop(box)
    return np.asarray(_resize(img, size, resize_mode), dtype=np.uint8)
