"""``boxes`` and ``masks``: regions read from a file (:mod:`~densevlm.data.region_sources.coco_file`), pooled by box
or by mask. A region's slot is its position among its image's regions in the file, whatever ``top_k`` and
``min_score`` keep, so a region keeps its name when the selection changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from densevlm.config.regions import RegionSourceConfig
from densevlm.data.panoptic import load_panoptic_png
from densevlm.data.region_sources.base import (GridSpec, ImageRegions, RegionSourceError, mask_extent,
                                               register_region_source, select)
from densevlm.data.region_sources.coco_file import check_box, decode_mask, read_region_file
from densevlm.data.region_sources.dataset import RegionSetDataset
from densevlm.data.sources import ImageSource
from densevlm.utils.hashing import sha256_file


def file_identity(cfg: RegionSourceConfig, grid: GridSpec) -> dict[str, Any]:
    path = Path(cfg.path)
    if not path.is_file():
        raise FileNotFoundError(f"data.regions.path: region file not found: {path}")
    return {"kind": cfg.kind, "path": str(path.resolve()), "sha256": sha256_file(path), "top_k": cfg.top_k,
            "min_score": cfg.min_score}


class FileRegions:
    """See the module docstring; ``pooling`` is "boxes" or "masks"."""

    def __init__(self, cfg: RegionSourceConfig, images: ImageSource, pooling: str) -> None:
        self.cfg, self.images, self.pooling = cfg, images, pooling
        self.file = read_region_file(cfg.path, images, need_masks=pooling == "masks")
        self.png_root = Path(cfg.panoptic_root) if cfg.panoptic_root else Path(cfg.path).with_suffix("")
        self._identity = file_identity(cfg, GridSpec())

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def __len__(self) -> int:
        return len(self.images)

    def _masks(self, index: int, entries: list, width: int, height: int) -> np.ndarray:
        if self.file.panoptic is not None:
            png = self.png_root / self.file.panoptic[index]
            ids = load_panoptic_png(png)
            if ids.shape != (height, width):
                raise RegionSourceError(f"{self.file.path}: PNG {png} is {ids.shape[1]}x{ids.shape[0]}, its image "
                                        f"{self.images.image_name(index)} is {width}x{height}")
            out = np.stack([ids == e.segmentation for e in entries]) if entries else np.zeros((0, height, width), bool)
            for e, m in zip(entries, out):
                if not m.any():
                    raise RegionSourceError(f"{self.file.path}: image {self.images.image_name(index)} segment "
                                            f"{e.id!r}: empty mask (absent from {png})")
            return out
        if not entries:
            return np.zeros((0, height, width), dtype=bool)
        return np.stack([decode_mask(e.segmentation, width, height,
                                     f"{self.file.path}: annotation {e.id!r} (image {self.images.image_name(index)})")
                         for e in entries])

    def regions(self, index: int, width: int, height: int) -> ImageRegions:
        entries = self.file.entries.get(index, [])
        keep = select(np.asarray([e.score for e in entries], dtype=np.float64), self.cfg.top_k, self.cfg.min_score)
        chosen = [entries[k] for k in keep]
        masks = self._masks(index, chosen, width, height) if self.pooling == "masks" else None
        boxes = []
        for j, e in enumerate(chosen):
            where = f"{self.file.path}: annotation {e.id!r} (image {self.images.image_name(index)})"
            if masks is not None:
                box = mask_extent(masks[j])  # exact: the box the mask's pixels span
            elif e.box is not None:
                box = e.box
            else:
                raise RegionSourceError(f"{where}: no 'bbox' (a boxes region source needs [x, y, w, h])")
            check_box(box, width, height, where)
            boxes.append(box)
        return ImageRegions(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), [int(k) for k in keep],
                            [e.id for e in chosen], np.asarray([e.score for e in chosen], dtype=np.float64),
                            (lambda: masks) if masks is not None else None, [e.category for e in chosen])

    def training_dataset(self, *, image_size: int, max_boxes: int, crop_size: Any, mean: Any, std: Any,
                         seed: int, teacher_cache: Any = None, mask_patches: Any = ()) -> Dataset:
        if teacher_cache is not None:
            raise ValueError("a teacher cache stores grid cells; a boxes or masks region source runs the teacher "
                             "online (teacher_cache: null)")
        return RegionSetDataset(self.images, self, image_size, max_boxes=max_boxes, crop_size=crop_size, mean=mean,
                                std=std, seed=seed, mask_patches=mask_patches)


@register_region_source("boxes", file_identity)
def build_boxes(cfg: RegionSourceConfig, images: ImageSource, grid: GridSpec) -> FileRegions:
    return FileRegions(cfg, images, "boxes")


@register_region_source("masks", file_identity)
def build_masks(cfg: RegionSourceConfig, images: ImageSource, grid: GridSpec) -> FileRegions:
    return FileRegions(cfg, images, "masks")
