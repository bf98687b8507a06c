"""The one interface every training-free segmenter has: normalised images in, per-class logits out.

Evaluation (``densevlm.evaluation.semseg``) and the inference protocol (:mod:`densevlm.segmenters.inference`) only
know this interface, so they never need to know which method made the logits (dense CLIP, Talk2DINO, ...).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Segmenter(nn.Module, metaclass=ABCMeta):
    """``forward(images) -> logits``: (B, 3, H, W) normalised images -> (B, C, H, W) per-class scores.

    Any H and W are accepted (the segmenter pads to its patch size itself) and the logits come back at the input
    size. Scores only need to be comparable across classes and linear to average over overlapping windows; a
    constant background score (:class:`densevlm.config.semseg.BackgroundConfig`) lives in the same space.

    Attributes:
        class_names: the C classes, column order of the logits.
        image_mean, image_std: per-channel normalisation the segmenter expects of its input.
    """

    class_names: list[str]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, H, W) logits at the input size."""

    @property
    def device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")

    def _check_names(self, class_names: Sequence[str], rows: int) -> list[str]:
        names = list(class_names)
        if len(names) != rows:
            raise ValueError(f"{type(self).__name__}: {len(names)} class names for {rows} class embeddings")
        return names


def pad_to_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad (B, 3, H, W) images right and bottom to multiples of ``patch_size`` (the patch grid must cover them)."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % patch_size, -w % patch_size
    return F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images


def upsample_to_input(maps: torch.Tensor, padded: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) patch-grid maps -> (B, C, H, W): bilinear to the padded input's size, then the padding cut off."""
    out = F.interpolate(maps, size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return out[:, :, :size[0], :size[1]]
