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
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"cannot read image {p}: {err}") from None
