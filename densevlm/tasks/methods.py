"""The ``METHODS`` registry of ``densevlm train``: a method's name -> the builder of its training parts.

A builder takes the recipe and the (not yet frozen) student and returns :class:`MethodParts`: the objective, the
training dataset, the teacher targets (a callback of the trainer, or None) and a few facts to print. Adding a
method is its objective in ``densevlm/methods/``, a builder registered here with :func:`register_method`, its
recipes and its tests; nothing in ``densevlm/engine/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from torch import nn
from torch.utils.data import Dataset

from densevlm.config.align import AlignConfig
from densevlm.data.region_sources import GridSpec, build_region_source
from densevlm.data.region_sources.added import WithAddedRegions
from densevlm.data.sources import ImageSource

log = logging.getLogger(__name__)


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
                 mask_patches: Sequence[int] = (), added: Optional[dict[int, list[dict[str, Any]]]] = None,
                 added_from: str = "", method_grid: Optional[str] = None) -> Dataset:
    """The recipe's region training set: regions from ``data.regions`` (the reference's random grid by default;
    ``data.grid_style: auto`` is the method's own grid: ``method_grid``, default the method's name).
    ``mask_patches``: the patch sizes of the models that pool a mask source's regions (the student's is always
    one). ``added``: regions a reviewer added (``labels apply``,
    read from ``added_from``), appended to a file source's regions; the grid has no place for them (a warning)."""
    style = (method_grid or cfg.method) if cfg.data.grid_style == "auto" else cfg.data.grid_style
    regions = build_region_source(cfg.data.regions, source, GridSpec(style, cfg.data.max_split))
    if added and cfg.data.regions.kind == "grid":
        log.warning("%s: %d added region(s) are not trained: grid cells are drawn at random, added regions need a "
                    "boxes or masks region source (data.regions)", added_from, sum(map(len, added.values())))
    elif added:
        regions = WithAddedRegions(regions, added, added_from)
    return regions.training_dataset(image_size=cfg.data.image_size, max_boxes=cfg.data.max_boxes or default_max_boxes,
                                    crop_size=crop_size, mean=student.image_mean, std=student.image_std,
                                    seed=cfg.loop.seed, teacher_cache=teacher_cache,
                                    mask_patches=(student.patch_size, *mask_patches))
