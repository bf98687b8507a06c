"""Reading images with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageReadError(OSError):
    """An image file is missing or cannot be decoded; the message names the file."""


def load_rgb(path: str | Path) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"image not found: {p}")
    try:
        with Image.open(p) as img:
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"cannot read image {p}: {err} Raise PIL.Image.MAX_IMAGE_PIXELS if it is "
                             "genuine, or downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"cannot read image {p}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. 16/32-bit integer and float images are scaled to their type's full range
    (PIL's own ``convert("RGB")`` clips them, turning a 16-bit photo almost white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" else (65535.0 if img.mode.startswith("I;16") or a.max() <= 65535 else a.max())
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")
