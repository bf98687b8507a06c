"""``grid``: the reference's random grid cells (training draws them per epoch, :class:`GridRegionDataset`); for
labelling, the ``max_split`` x ``max_split`` cells, each named by its global cell index."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from densevlm.config.regions import RegionSourceConfig
from densevlm.data.grid_boxes import cell_offsets, grid_choices
from densevlm.data.region_sources.base import GridSpec, ImageRegions, register_region_source
from densevlm.data.regions import GridRegionDataset
from densevlm.data.sources import ImageSource


def grid_identity(cfg: RegionSourceConfig, grid: GridSpec) -> dict[str, Any]:
    return {"kind": "grid", "grid_style": grid.style, "max_split": grid.max_split}


def cells_on_canvas(boxes: np.ndarray, width: int, height: int, size: int) -> torch.Tensor:
    """Grid cells in pixels -> the canvas, with :func:`~densevlm.data.grid_boxes.grid_boxes_with_cells`'s own
    arithmetic (float32 pixels times the unrounded resize factor over the canvas side, clamped)."""
    scale = size / max(width, height)
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * (scale / size)).clamp_(0.0, 1.0)


class GridRegions:
    """See the module docstring."""

    pooling = "boxes"

    def __init__(self, cfg: RegionSourceConfig, images: ImageSource, grid: GridSpec) -> None:
        self.cfg, self.images, self.grid = cfg, images, grid
        choices = grid_choices(grid.max_split, grid.style)
        finest = (grid.max_split, grid.max_split)
        if finest not in choices:
            raise ValueError(f"grid style {grid.style!r} with max_split {grid.max_split} has no {finest} choice")
        self.rows, self.cols = finest
        self.first_cell = cell_offsets(choices)[choices.index(finest)]

    def identity(self) -> dict[str, Any]:
        return grid_identity(self.cfg, self.grid)

    def regions(self, index: int, width: int, height: int) -> ImageRegions:
        # The same arithmetic as grid_boxes._cells, so a labelled cell is bit for bit the box training draws for it.
        cells = [(c * width / self.cols, r * height / self.rows, (c + 1) * width / self.cols,
                  (r + 1) * height / self.rows) for r in range(self.rows) for c in range(self.cols)]
        slots = [self.first_cell + k for k in range(len(cells))]
        return ImageRegions(np.asarray(cells, dtype=np.float64), slots, list(slots), np.ones(len(cells)),
                            to_canvas=cells_on_canvas)

    def training_dataset(self, *, image_size: int, max_boxes: int, crop_size: Any, mean: Any, std: Any,
                         seed: int, teacher_cache: Any = None, mask_patches: Any = ()) -> Dataset:
        return GridRegionDataset(self.images, image_size, grid_style=self.grid.style,
                                 max_split=self.grid.max_split, max_boxes=max_boxes, crop_size=crop_size, mean=mean,
                                 std=std, seed=seed, teacher_cache=teacher_cache)


@register_region_source("grid", grid_identity)
def build_grid(cfg: RegionSourceConfig, images: ImageSource, grid: GridSpec) -> GridRegions:
    return GridRegions(cfg, images, grid)
