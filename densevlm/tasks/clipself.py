"""CLIPSelf's parts for ``densevlm train``: the region-to-crop objective and grid regions with crops."""

from __future__ import annotations

import copy

from torch import nn

from densevlm.config.align import AlignConfig
from densevlm.data.sources import ImageSource
from densevlm.methods.clipself import CLIPSelfObjective
from densevlm.models import create_backbone
from densevlm.tasks.methods import MethodParts, grid_dataset, register_method

DEFAULT_MAX_BOXES = 20


@register_method("clipself")
def build_clipself(cfg: AlignConfig, student: nn.Module) -> MethodParts:
    """The teacher is ``cfg.teacher``, or a copy of the initial student (so build this before freezing)."""
    source = ImageSource(cfg.data.source)
    teacher = create_backbone(cfg.teacher) if cfg.teacher is not None else copy.deepcopy(student)
    dataset = grid_dataset(cfg, source, student, default_max_boxes=DEFAULT_MAX_BOXES,
                           crop_size=cfg.data.crop_size or teacher.native_image_size)
    return MethodParts(CLIPSelfObjective(teacher), dataset)
