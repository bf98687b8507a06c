"""Helpers shared by the region objectives: the student's region features, computed through the DDP wrapper."""

from __future__ import annotations

import torch
from torch import nn


def per_image_boxes(boxes: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """(B, K, 4) padded boxes + (B, K) validity -> list of (K_i, 4) valid boxes per image."""
    return [b[v] for b, v in zip(boxes, valid)]


def student_region_features(model: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """Dense map of the images, RoIAlign-pooled over the boxes: (sum K_i, C). Run via ``step_model(fn, ...)``."""
    return model.pool_boxes(model.encode_dense(images), boxes)
