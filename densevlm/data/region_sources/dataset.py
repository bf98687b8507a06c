"""Training samples with regions from a file source: the padded square image plus up to ``max_boxes`` of the
image's regions (a random subset per epoch when it has more), laid out as :class:`GridRegionDataset` lays out its
grid boxes, so the objectives take either."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from PIL import Image

from densevlm.data.captions import item_rng
from densevlm.data.region_sources.base import RegionSource, regions_on_canvas
from densevlm.data.regions import RegionImages
from densevlm.data.sources import ImageSource
from densevlm.data.transforms import CLIP_MEAN, CLIP_STD, resize_longest_pad, to_tensor


class RegionSetDataset(RegionImages):
    """Items: ``image`` (3, S, S), ``boxes`` (max_boxes, 4) normalised on the canvas, ``valid`` (max_boxes,),
    ``cells`` (max_boxes,) each region's slot (-1 for padding), ``index``; a mask source adds ``masks``
    {``p<patch>``: (max_boxes, S // patch, S // patch)} for each patch size of ``mask_patches`` (the student's
    and the teacher's token grids); ``crop_size`` adds ``crops`` as :class:`GridRegionDataset` does."""

    def __init__(self, images: ImageSource, regions: RegionSource, image_size: int, *, max_boxes: int = 36,
                 crop_size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, seed: int = 0, mask_patches: Sequence[int] = ()) -> None:
        self.source, self.regions, self.image_size, self.max_boxes = images, regions, image_size, max_boxes
        self.crop_size, self.mean, self.std, self.seed, self.epoch = crop_size, mean, std, seed, 0
        self.mask_patches = tuple(sorted(set(mask_patches)))
        if regions.pooling == "masks" and not self.mask_patches:
            raise ValueError("a masks region source needs the patch sizes of the models that pool its masks")

    def item(self, index: int, img: Image.Image) -> dict[str, Any]:
        size, k_max = self.image_size, self.max_boxes
        regions = self.regions.regions(index, img.width, img.height)
        keep = list(range(len(regions)))
        if len(keep) > k_max:
            keep = sorted(item_rng(self.seed, self.epoch, index).sample(keep, k_max))
        placed = regions_on_canvas(regions, keep, img.width, img.height, size, self.mask_patches)
        n = len(keep)
        boxes = torch.zeros(k_max, 4)
        boxes[:n] = placed["boxes"]
        valid = torch.zeros(k_max, dtype=torch.bool)
        valid[:n] = True
        cells = torch.full((k_max,), -1, dtype=torch.long)
        cells[:n] = torch.tensor([regions.slots[k] for k in keep], dtype=torch.long)
        canvas, _ = resize_longest_pad(img, size)
        item: dict[str, Any] = {"image": to_tensor(canvas, self.mean, self.std), "boxes": boxes, "valid": valid,
                                "cells": cells, "index": index}
        if "masks" in placed:
            item["masks"] = {}
            for key, grid_masks in placed["masks"].items():
                padded = torch.zeros(k_max, *grid_masks.shape[1:])
                padded[:n] = grid_masks
                item["masks"][key] = padded
        if self.crop_size:
            crops = torch.zeros(k_max, 3, self.crop_size, self.crop_size)
            for j, k in enumerate(keep):
                x0, y0, x1, y1 = (round(v) for v in regions.boxes[k].tolist())
                crop, _ = resize_longest_pad(img.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))), self.crop_size)
                crops[j] = to_tensor(crop, self.mean, self.std)
            item["crops"] = crops
        return item
