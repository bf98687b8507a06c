"""Helpers shared by the region objectives: the student's region features, computed through the DDP wrapper."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def per_image_boxes(boxes: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """(B, K, 4) padded boxes + (B, K) validity -> list of (K_i, 4) valid boxes per image."""
    return [b[v] for b, v in zip(boxes, valid)]


def batch_masks(batch: dict[str, Any]) -> Optional[dict[str, torch.Tensor]]:
    """The batch's region masks {``p<patch>``: (B, K, g, g)} with ``valid`` under ``"valid"``, or None for box
    regions (a mask region source puts ``masks`` in its items)."""
    if "masks" not in batch:
        return None
    return {**batch["masks"], "valid": batch["valid"]}


def region_args(batch: dict[str, Any], boxes: list[torch.Tensor]) -> tuple[Any, ...]:
    """The arguments of :func:`student_region_features` for ``batch``: ``(images, boxes)``, and the masks only for
    a mask region source (box regions keep the call they always had)."""
    masks = batch_masks(batch)
    return (batch["image"], boxes) if masks is None else (batch["image"], boxes, masks)


def pool_regions(model: nn.Module, dense: torch.Tensor, boxes: list[torch.Tensor],
                 masks: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """(sum K_i, C) region features of a dense map: RoIAlign over the boxes, or with ``masks`` (from
    :func:`batch_masks`) the masked mean over each valid region's mask on ``model``'s own token grid."""
    if masks is None:
        return model.pool_boxes(dense, boxes)
    key = f"p{model.patch_size}"
    if key not in masks:
        raise ValueError(f"region masks come on the token grids {sorted(k for k in masks if k != 'valid')}, not on "
                         f"this model's ({key}: patch size {model.patch_size})")
    return model.pool_masks(dense, [m[v] for m, v in zip(masks[key], masks["valid"])])


def student_region_features(model: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor],
                            masks: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Dense map of the images pooled over the regions: (sum K_i, C). Run via ``step_model(fn, ...)``."""
    return pool_regions(model, model.encode_dense(images), boxes, masks)
