"""The one interface every training-free segmenter has: normalised images in, per-class logits out.

Evaluation (``densevlm.evaluation.semseg``) and the inference protocol (:mod:`densevlm.segmenters.inference`) only
know this interface, so they never need to know which method made the logits (dense CLIP, Talk2DINO, ...).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Sequence

import torch
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
