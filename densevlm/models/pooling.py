"""Region features from a dense map: RoIAlign over boxes, masked means over masks.

Both follow the reference (``EVAVisionTransformer.extract_roi_features`` / ``mask_pool``): the dense map is the
per-token L2-normalised map from ``encode_dense``, and the pooled vectors are returned as they come out of the
pooling, not re-normalised (callers normalise when they compare against text embeddings).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

BoxesArg = Union[Sequence[torch.Tensor], torch.Tensor]
MasksArg = Union[Sequence[torch.Tensor], torch.Tensor]


def _check_dense(dense: torch.Tensor) -> None:
    if dense.ndim != 4:
        raise ValueError(f"dense map: expected a (B, C, h, w) tensor, got shape {tuple(dense.shape)}")


def pool_boxes(dense: torch.Tensor, boxes: BoxesArg) -> torch.Tensor:
    """RoIAlign (1x1 output) of normalised boxes on a dense map, as the reference ``extract_roi_features``.

    Args:
        dense: (B, C, h, w) dense map.
        boxes: either a list with one (K_i, 4) tensor per image of normalised ``[x0, y0, x1, y1]`` boxes
            (coordinates in [0, 1] of the image), or one (K, 5) tensor ``[batch_index, x0, y0, x1, y1]`` with
            normalised coordinates.

    Returns:
        (K, C) features, boxes of image 0 first (list form) or in the row order given (tensor form).

    Boxes are scaled to the (w, h) token grid and pooled with ``spatial_scale=1.0``, ``sampling_ratio=-1``
    and ``aligned=True``: a box edge at normalised 0 lies on the left edge of the first token, not on its
    centre.
    """
    _check_dense(dense)
    b, _, h, w = dense.shape
    scale = torch.tensor([w, h, w, h], dtype=dense.dtype, device=dense.device)
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes: a tensor must be (K, 5) [batch_index, x0, y0, x1, y1], got shape {tuple(boxes.shape)}"
            )
        rois = boxes.to(device=dense.device, dtype=dense.dtype)
        if rois.numel() and (rois[:, 0].min() < 0 or rois[:, 0].max() >= b):
            raise ValueError(f"boxes: batch indices must lie in [0, {b - 1}], got {rois[:, 0].unique().tolist()}")
        rois = torch.cat([rois[:, :1], rois[:, 1:] * scale], dim=1)
    else:
        if len(boxes) != b:
            raise ValueError(f"boxes: got {len(boxes)} per-image box tensors for a batch of {b} images")
        scaled = []
        for i, per_image in enumerate(boxes):
            if per_image.ndim != 2 or per_image.shape[1] != 4:
                raise ValueError(
                    f"boxes[{i}]: expected a (K, 4) tensor of normalised [x0, y0, x1, y1], "
                    f"got shape {tuple(per_image.shape)}"
                )
            scaled.append(per_image.to(device=dense.device, dtype=dense.dtype) * scale)
        rois = scaled
    return roi_align(dense, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=True)[
        ..., 0, 0
    ]


def pool_masks(dense: torch.Tensor, masks: MasksArg) -> torch.Tensor:
    """Masked mean of a dense map, as the reference ``mask_pool``.

    Args:
        dense: (B, C, h, w) dense map.
        masks: either a (B, K, h, w) tensor or a list with one (K_i, h, w) tensor per image, binary or
            fractional weights on the token grid (see :func:`masks_to_token_grid` for full-resolution masks).

    Returns:
        (sum K_i, C) weighted means, masks of image 0 first. An empty mask gives a zero vector (the reference
        divides by ``sum + 1e-12``).
    """
    _check_dense(dense)
    b, c, h, w = dense.shape
    if isinstance(masks, torch.Tensor) and masks.ndim != 4:
        raise ValueError(f"masks: a tensor must be (B, K, h, w), got shape {tuple(masks.shape)}")
    per_image = list(masks.unbind(0)) if isinstance(masks, torch.Tensor) else list(masks)
    if len(per_image) != b:
        raise ValueError(f"masks: got masks for {len(per_image)} images, the dense map has {b}")
    tokens = dense.flatten(2)  # (B, C, h*w)
    out = []
    for i, m in enumerate(per_image):
        if m.ndim != 3 or tuple(m.shape[-2:]) != (h, w):
            raise ValueError(
                f"masks[{i}]: expected (K, {h}, {w}) on the token grid of the dense map, got shape "
                f"{tuple(m.shape)}; use masks_to_token_grid() to bring full-resolution masks to the grid"
            )
        weights = m.to(device=dense.device, dtype=dense.dtype).flatten(1)  # (K, h*w)
        summed = weights @ tokens[i].T  # (K, C)
        out.append(summed / (weights.sum(1, keepdim=True) + 1e-12))
    if not out:
        return dense.new_zeros(0, c)
    return torch.cat(out, dim=0)


def masks_to_token_grid(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Downsample full-resolution masks (..., H, W) to the (H // p, W // p) token grid by area averaging.

    Each output value is the fraction of the token's p x p pixel cell covered by the mask. Pixels beyond
    the last full patch are dropped, exactly as the patch-embedding convolution drops them, so token (i, j)
    is averaged over the pixels it actually sees.
    """
    if masks.ndim < 2:
        raise ValueError(f"masks: expected (..., H, W), got shape {tuple(masks.shape)}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    height, width = masks.shape[-2:]
    h, w = height // patch_size, width // patch_size
    if h == 0 or w == 0:
        raise ValueError(f"masks of size {height}x{width} are smaller than one {patch_size}-px patch")
    lead = masks.shape[:-2]
    m = masks[..., : h * patch_size, : w * patch_size].reshape(-1, 1, h * patch_size, w * patch_size)
    m = m.float() if not torch.is_floating_point(m) else m
    pooled = F.avg_pool2d(m, kernel_size=patch_size, stride=patch_size)
    return pooled.reshape(*lead, h, w)
