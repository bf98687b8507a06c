"""Training samples for region-language alignment: a padded square image plus random grid boxes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from densevlm.data.captions import item_rng
from densevlm.data.grid_boxes import grid_boxes_with_cells, grid_choices
from densevlm.data.sources import ImageSource
from densevlm.data.transforms import CLIP_MEAN, CLIP_STD, resize_longest_center_pad, resize_longest_pad, to_tensor


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
    them; DenseVLM does not), ``crops`` (max_boxes, 3, crop, crop) taken from the original image (longest side
    resized to ``crop_size``, centred on a black square as the reference's ``ResizeMaxSize``), zero where a box is
    padding. With a ``teacher_cache`` (a :class:`~densevlm.data.teacher_cache.TeacherCache` opened for this
    source) items also carry ``teacher_features`` (max_boxes, D) float16, the cached teacher region features of the
    drawn cells (zero for padding), ``cached`` (whether the image was in the cache) and ``size`` (the original
    width and height, from which an uncached image's cells are computed); with a compact target store
    (:class:`~densevlm.data.compact_cache.CompactTargetStore`) the drawn cells' top-k targets instead of the
    features (its ``item_fields``).
    """

    def __init__(self, source: ImageSource, image_size: int, *, grid_style: str = "densevlm", max_split: int = 6,
                 max_boxes: int = 36, crop_size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, seed: int = 0, teacher_cache: Any = None) -> None:
        self.source, self.image_size, self.max_boxes, self.crop_size = source, image_size, max_boxes, crop_size
        self.teacher_cache = teacher_cache
        self.choices = grid_choices(max_split, grid_style)
        self.mean, self.std, self.seed, self.epoch = mean, std, seed, 0

    def item(self, index: int, img: Image.Image) -> dict[str, Any]:
        item, cells = region_item(img, index, self)
        if self.teacher_cache is not None:
            item.update(self.teacher_cache.item_fields(index, cells))
            item["size"] = torch.tensor([img.width, img.height])  # for the teacher's cells of an uncached image
        return item


def region_item(img: Image.Image, index: int, spec: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """(item, cells) of image ``index``: ``image``, ``boxes``, ``valid``, ``cells``, ``index`` and (``crop_size``)
    ``crops``, drawn as ``spec`` (a :class:`GridRegionDataset` or :class:`ShardRegionItems`) says, with the
    randomness of (``spec.seed``, ``spec.epoch``, ``index``)."""
    rng = item_rng(spec.seed, spec.epoch, index)
    canvas, scale = resize_longest_pad(img, spec.image_size)
    boxes, valid, pixel, cells = grid_boxes_with_cells(img.width, img.height, scale, spec.image_size, rng,
                                                       spec.choices, spec.max_boxes)
    item = {"image": to_tensor(canvas, spec.mean, spec.std), "boxes": boxes, "valid": valid, "cells": cells,
            "index": index}
    if spec.crop_size:
        crops = torch.zeros(spec.max_boxes, 3, spec.crop_size, spec.crop_size)
        for k in range(int(valid.sum())):
            x0, y0, x1, y1 = (round(v) for v in pixel[k].tolist())
            crop = resize_longest_center_pad(img.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))), spec.crop_size)
            crops[k] = to_tensor(crop, spec.mean, spec.std)
        item["crops"] = crops
    return item, cells


PayloadItems = Callable[[dict[str, Any], torch.Tensor], dict[str, Any]]


class ShardRegionItems:
    """A streamed shard sample -> the same training item as :class:`GridRegionDataset` gives for that image, plus
    what ``payload_items(payload, cells)`` makes of the sample's stored arrays for the drawn cells (e.g. their
    compact teacher targets); ``None``: the payload is not used."""

    def __init__(self, image_size: int, *, grid_style: str = "densevlm", max_split: int = 6, max_boxes: int = 36,
                 crop_size: Optional[int] = None, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, seed: int = 0,
                 payload_items: Optional[PayloadItems] = None) -> None:
        self.image_size, self.max_boxes, self.crop_size = image_size, max_boxes, crop_size
        self.choices = grid_choices(max_split, grid_style)
        self.mean, self.std, self.seed, self.epoch = mean, std, seed, 0
        self.payload_items = payload_items

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        item, cells = region_item(sample["image"], sample["index"], self)
        if self.payload_items is not None:
            item.update(self.payload_items(sample["payload"], cells))
        return item
