"""Regions a reviewer added (``densevlm labels apply``), appended to a file source's regions for training."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from densevlm.data.region_sources.base import ImageRegions, RegionSource, mask_extent
from densevlm.data.region_sources.coco_file import check_box, decode_mask
from densevlm.data.region_sources.dataset import RegionSetDataset


class WithAddedRegions:
    """``inner``'s regions of each image, then the added ones (``added``: image index -> entries with ``slot``,
    ``bbox`` [x, y, w, h] and optionally ``segmentation``; a box-only entry of a mask source is its rectangle)."""

    def __init__(self, inner: RegionSource, added: dict[int, list[dict[str, Any]]], where: str) -> None:
        self.inner, self.added, self.where = inner, added, where
        self.pooling = inner.pooling
        self.images = inner.images

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def __len__(self) -> int:
        return len(self.images)

    def regions(self, index: int, width: int, height: int) -> ImageRegions:
        base = self.inner.regions(index, width, height)
        extra = self.added.get(index, [])
        if not extra:
            return base
        boxes, masks = [], []
        for a in extra:
            where = f"{self.where}: added region {a.get('source_id')!r} (image {a['image']})"
            x, y, w, h = (float(v) for v in a["bbox"])
            box = (x, y, x + w, y + h)
            if self.pooling == "masks":
                if a.get("segmentation"):
                    mask = decode_mask(a["segmentation"], width, height, where)
                else:
                    mask = np.zeros((height, width), dtype=bool)
                    mask[int(round(y)):int(round(y + h)), int(round(x)):int(round(x + w))] = True
                    if not mask.any():
                        raise ValueError(f"{where}: empty box")
                masks.append(mask)
                box = mask_extent(mask)
            check_box(box, width, height, where)
            boxes.append(box)
        all_masks = None
        if base.masks is not None:
            stacked = np.concatenate([base.masks(), np.stack(masks)])
            all_masks = lambda: stacked  # noqa: E731
        return ImageRegions(np.concatenate([base.boxes, np.asarray(boxes, dtype=np.float64)]),
                            base.slots + [a["slot"] for a in extra], base.ids + [a.get("source_id") for a in extra],
                            np.concatenate([base.scores, np.ones(len(extra))]), all_masks,
                            base.categories + [None] * len(extra))

    def training_dataset(self, *, image_size: int, max_boxes: int, crop_size: Any, mean: Any, std: Any,
                         seed: int, teacher_cache: Any = None, mask_patches: Any = ()) -> Dataset:
        return RegionSetDataset(self.images, self, image_size, max_boxes=max_boxes, crop_size=crop_size, mean=mean,
                                std=std, seed=seed, mask_patches=mask_patches)
