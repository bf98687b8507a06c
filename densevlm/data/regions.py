"""Training samples for region-language alignment: a padded square image plus random grid boxes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from densevlm.data.captions import item_rng
from densevlm.data.grid_boxes import grid_boxes_with_cells, grid_choices
from densevlm.data.sources import ImageSource
from densevlm.data.transforms import CLIP_MEAN, CLIP_STD, resize_longest_pad, to_tensor


class RegionImages(Dataset, ABC):
    """What every region training set shares: an image source (``self.source``), an epoch for per-epoch draws
    (``set_epoch``), and a bad image skipped for the next one when the source says so."""

    source: ImageSource
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def image_name(self, index: int) -> str:
        return self.source.image_name(index)

    @abstractmethod
    def item(self, index: int, img: Image.Image) -> dict[str, Any]:
        """Item ``index`` from its loaded image ``img``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.source.load_or_skip(index, "the next image used instead")
        if img is None:
            return self[(index + 1) % len(self)]
        return self.item(index, img)


class GridRegionDataset(RegionImages):
    """Image (resize-longest, zero-padded to ``image_size``) with up to ``max_boxes`` random grid boxes.

    Items: ``image`` (3, S, S), ``boxes`` (max_boxes, 4) normalised on the canvas, ``valid`` (max_boxes,),
    ``cells`` (max_boxes,) each box's global grid-cell index (-1 for padding, see
    :func:`~densevlm.data.grid_boxes.cell_offsets`) and, only when ``crop_size`` is set (CLIPSelf's teacher needs
    them; DenseVLM does not), ``crops`` (max_boxes, 3, crop, crop) taken from the original image, zero where a box
    is padding. With a ``teacher_cache`` (a :class:`~densevlm.data.teacher_cache.TeacherCache` opened for this
    source) items also carry ``teacher_features`` (max_boxes, D) float16, the cached teacher region features of the
    drawn cells (zero for padding), ``cached`` (whether the image was in the cache) and ``size`` (the original
    width and height, from which an uncached image's cells are computed).
    """

    def __init__(self, source: ImageSource, image_size: int, *, grid_style: str = "densevlm", max_split: int = 6,
                 max_boxes: int = 36, crop_size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, seed: int = 0, teacher_cache: Any = None) -> None:
        self.source, self.image_size, self.max_boxes, self.crop_size = source, image_size, max_boxes, crop_size
        self.teacher_cache = teacher_cache
        self.choices = grid_choices(max_split, grid_style)
        self.mean, self.std, self.seed, self.epoch = mean, std, seed, 0

    def item(self, index: int, img: Image.Image) -> dict[str, Any]:
        rng = item_rng(self.seed, self.epoch, index)
        canvas, scale = resize_longest_pad(img, self.image_size)
        boxes, valid, pixel, cells = grid_boxes_with_cells(img.width, img.height, scale, self.image_size, rng,
                                                           self.choices, self.max_boxes)
        item = {"image": to_tensor(canvas, self.mean, self.std), "boxes": boxes, "valid": valid, "cells": cells,
                "index": index}
        if self.teacher_cache is not None:
            item["teacher_features"], item["cached"] = self.teacher_cache.lookup(index, cells)
            item["size"] = torch.tensor([img.width, img.height])  # for the teacher's cells of an uncached image
        if self.crop_size:
            crops = torch.zeros(self.max_boxes, 3, self.crop_size, self.crop_size)
            for k in range(int(valid.sum())):
                x0, y0, x1, y1 = (round(v) for v in pixel[k].tolist())
                crop, _ = resize_longest_pad(img.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))), self.crop_size)
                crops[k] = to_tensor(crop, self.mean, self.std)
            item["crops"] = crops
        return item
