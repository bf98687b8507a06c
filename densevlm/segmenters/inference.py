"""The inference protocol around any :class:`Segmenter`: windows, overlap averaging, background, upsampling.

mmseg's slide inference: windows of ``crop`` pixels every ``stride`` pixels, the last row and column of windows
shifted back to end at the image border, logits summed per pixel and divided by the number of windows covering
it. Windows of all images in a batch are run together, ``batch_size`` at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from densevlm.segmenters.base import Segmenter

Window = tuple[int, int, int, int]  # y1, y2, x1, x2


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """The windows of mmseg's ``slide_inference`` over an (height, width) image; smaller images are one window."""
    if crop < 1 or not 1 <= stride <= crop:
        raise ValueError(f"slide windows: expected crop >= 1 and 1 <= stride <= crop, got crop {crop}, stride {stride}")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


@torch.no_grad()
def window_logits(segmenter: Segmenter, images: Sequence[torch.Tensor], *, mode: Literal["slide", "whole"] = "slide",
                  crop_size: int = 448, stride: int = 224, batch_size: int = 8) -> list[torch.Tensor]:
    """Per image (3, h, w), the (C, h, w) logits averaged over the windows that cover each pixel.

    ``mode="whole"`` runs each image as one window. Windows of equal shape are batched across images.
    """
    device = segmenter.device
    groups: "OrderedDict[tuple[int, int], list[tuple[int, Window]]]" = OrderedDict()
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{i}]: expected a (3, H, W) tensor, got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        windows = [(0, h, 0, w)] if mode == "whole" else slide_windows(h, w, crop_size, stride)
        for win in windows:
            groups.setdefault((win[1] - win[0], win[3] - win[2]), []).append((i, win))
    windows_of = [0] * len(images)
    for jobs in groups.values():
        for i, _ in jobs:
            windows_of[i] += 1
    sums: list[Optional[torch.Tensor]] = [None] * len(images)
    counts: list[Optional[torch.Tensor]] = [None] * len(images)  # stays None for a single window (no copies)
    for jobs in groups.values():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            x = torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk]).to(device)
            out = segmenter(x).float()
            if out.ndim != 4 or out.shape[0] != x.shape[0] or out.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"{type(segmenter).__name__} returned logits of shape {tuple(out.shape)} for input "
                                 f"{tuple(x.shape)}; expected (B, C, H, W) at the input size")
            for (i, (y1, y2, x1, x2)), logits in zip(chunk, out):
                if windows_of[i] == 1:
                    sums[i] = logits
                    continue
                if sums[i] is None:
                    sums[i] = torch.zeros((logits.shape[0], *images[i].shape[-2:]), device=device)
                    counts[i] = torch.zeros(images[i].shape[-2:], device=device)
                sums[i][:, y1:y2, x1:x2] += logits
                counts[i][y1:y2, x1:x2] += 1
    # Every pixel is covered: the windows tile the image.
    return [s if c is None else s / c for s, c in zip(sums, counts)]


def add_background(logits: torch.Tensor, index: int, score: float) -> torch.Tensor:
    """Insert a constant ``score`` channel at class ``index`` of (C, H, W) or (B, C, H, W) logits."""
    dim = logits.ndim - 3
    shape = list(logits.shape)
    shape[dim] = 1
    bg = torch.full(shape, float(score), dtype=logits.dtype, device=logits.device)
    return torch.cat([logits.narrow(dim, 0, index), bg, logits.narrow(dim, index, logits.shape[dim] - index)], dim)


@torch.no_grad()
def predict(segmenter: Segmenter, images: Sequence[torch.Tensor], output_sizes: Sequence[tuple[int, int]], *,
            mode: Literal["slide", "whole"] = "slide", crop_size: int = 448, stride: int = 224,
            batch_size: int = 8, background: Optional[tuple[int, float]] = None) -> list[torch.Tensor]:
    """Per image, the (C, H, W) logits at its output size (the label's): windows, background, bilinear upsampling.

    ``background``: (class index, constant score) inserts the background channel of the background rule.
    """
    out = []
    for logits, size in zip(window_logits(segmenter, images, mode=mode, crop_size=crop_size, stride=stride,
                                          batch_size=batch_size), output_sizes):
        if background is not None:
            logits = add_background(logits, *background)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
        out.append(logits)
    return out
