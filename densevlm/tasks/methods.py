"""The ``METHODS`` registry of ``densevlm train``: a method's name -> the builder of its training parts.

A builder takes the recipe and the (not yet frozen) student and returns :class:`MethodParts`: the objective, the
training dataset, the teacher targets (a callback of the trainer, or None) and a few facts to print. Adding a
method is its objective in ``densevlm/methods/``, a builder registered here with :func:`register_method`, its
recipes and its tests; nothing in ``densevlm/engine/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn
from torch.utils.data import Dataset

from densevlm.config.align import AlignConfig
from densevlm.data.regions import GridRegionDataset
from densevlm.data.sources import ImageSource


@dataclass
class MethodParts:
    """What a method brings to the one training loop."""

    objective: Any
    dataset: Dataset
    teacher_targets: Any = None  # a TeacherTargets (densevlm.methods.teacher_targets), registered as a callback
    info: dict[str, Any] = field(default_factory=dict)


MethodBuilder = Callable[[AlignConfig, nn.Module], MethodParts]

#: method name (``cfg.method``) -> ``build(cfg, student) -> MethodParts``.
METHODS: dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    def register(build: MethodBuilder) -> MethodBuilder:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = build
        return build
    return register


def grid_dataset(cfg: AlignConfig, source: ImageSource, student: nn.Module, *, default_max_boxes: int,
                 crop_size: Optional[int] = None, teacher_cache: Any = None,
                 method_grid: Optional[str] = None) -> GridRegionDataset:
    """The recipe's grid-region training set (``data.grid_style: auto`` is the method's own grid: ``method_grid``,
    default the method's name)."""
    style = (method_grid or cfg.method) if cfg.data.grid_style == "auto" else cfg.data.grid_style
    return GridRegionDataset(source, cfg.data.image_size, grid_style=style, max_split=cfg.data.max_split,
                             max_boxes=cfg.data.max_boxes or default_max_boxes, crop_size=crop_size,
                             mean=student.image_mean, std=student.image_std, seed=cfg.loop.seed,
                             teacher_cache=teacher_cache)
