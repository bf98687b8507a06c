"""Image transforms shared by training and evaluation."""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP statistics, also used by EVA-CLIP and open_clip's defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(img: Image.Image, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """PIL RGB image -> normalised float tensor C×H×W."""
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (arr - m) / s


def random_resized_crop(img: Image.Image, size: int, rng: random.Random, scale: tuple[float, float] = (0.8, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True) -> Image.Image:
    """Crop a random area fraction in ``scale`` with aspect in ``ratio``, resize to size×size, maybe flip.

    Uses the given ``rng`` rather than global state so augmentation is a function of (seed, epoch, index).
    """
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        log_r = (np.log(ratio[0]), np.log(ratio[1]))
        aspect = float(np.exp(rng.uniform(*log_r)))
        cw, ch = int(round((target * aspect) ** 0.5)), int(round((target / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        cw, ch = min(w, h), min(w, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    out = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BICUBIC)
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new width, new height) of the content on the ``size`` canvas of :func:`resize_longest_pad`: a point
    ``(x, y)`` of the original image lies at ``(x * new_w / width, y * new_h / height)`` on the canvas."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_longest_pad(img: Image.Image, size: int) -> tuple[Image.Image, float]:
    """Resize so the longest side is ``size`` and zero-pad right/bottom to size×size (the reference protocol).

    Returns the padded image and the scale factor applied to the original coordinates.
    """
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = resized_size(w, h, size)
    resized = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, (0, 0))
    return canvas, scale


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the short side to ``size``, then the centre ``size`` x ``size`` crop (the reference's)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
