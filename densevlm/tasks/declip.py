"""DeCLIP's parts for ``densevlm train``: the content + context objective, CLIPSelf's grid regions with crops, the
frozen teacher (a copy of the initial student unless ``cfg.teacher``) and the frozen VFM (``cfg.declip.vfm``)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from torch import nn

from densevlm import zoo
from densevlm.config.align import AlignConfig
from densevlm.config.core import ConfigError
from densevlm.data.sources import ImageSource
from densevlm.methods.declip import DeCLIPObjective, check_grids, vfm_grid_for
from densevlm.models import create_backbone
from densevlm.models.patch_attention import PatchBackbone, create_patch_backbone
from densevlm.tasks.methods import MethodParts, grid_dataset, register_method

DEFAULT_MAX_BOXES = 20  # the released --max-boxes
RANDOM_VFM = "random"  # declip.vfm.pretrained for a randomly initialised VFM (tests)


def create_vfm(cfg: AlignConfig) -> PatchBackbone:
    """The frozen VFM of ``cfg.declip.vfm``; its weights are required (a file, "timm", a zoo name or run dir).

    Raises:
        FileNotFoundError: the weights file (or run directory) named by ``declip.vfm.pretrained`` is missing.
        ConfigError: no weights named at all (``pretrained: random`` asks for a random VFM explicitly).
    """
    v = cfg.declip.vfm
    if v.pretrained == RANDOM_VFM:
        return create_patch_backbone(dataclasses.replace(v, pretrained=None))
    has_weights = bool(v.pretrained) or (v.family == "clip" and zoo.architecture(v.name) is not None)
    if not has_weights:
        raise ConfigError(f"declip.vfm.pretrained: DeCLIP's VFM {v.name!r} ({v.family}) needs weights: a local "
                          "file, 'timm' (DINOv2 from timm's hub) or a zoo name; 'random' for a random init (tests)")
    if v.pretrained and v.pretrained != "timm" and not Path(v.pretrained).expanduser().exists():
        raise FileNotFoundError(f"declip.vfm.pretrained: VFM weights not found: {v.pretrained}")
    return create_patch_backbone(v)


@register_method("declip")
def build_declip(cfg: AlignConfig, student: nn.Module) -> MethodParts:
    """Build before freezing: the teacher is a copy of the initial student."""
    p = cfg.declip
    student.check_decoupled(p.mode)
    vfm = create_vfm(cfg)
    grid = student.grid_size((cfg.data.image_size, cfg.data.image_size))
    check_grids(student.name, grid, vfm.name, vfm_grid_for(grid, vfm.patch_size, p.vfm_image_size),
                vfm.patch_size, p.vfm_image_size)  # fail now, not at the first step
    teacher = create_backbone(cfg.teacher) if cfg.teacher is not None else copy.deepcopy(student)
    dataset = grid_dataset(cfg, ImageSource(cfg.data.source), student, default_max_boxes=DEFAULT_MAX_BOXES,
                           crop_size=cfg.data.crop_size or teacher.native_image_size, method_grid="clipself")
    objective = DeCLIPObjective(teacher, vfm, mode=p.mode, content_weight=p.content_weight,
                                context_weight=p.context_weight, student_mean=student.image_mean,
                                student_std=student.image_std, vfm_image_size=p.vfm_image_size,
                                student_name=student.name)
    return MethodParts(objective, dataset, info={"mode": p.mode, "vfm": vfm.name, "vfm_patch": vfm.patch_size,
                                                 "weights": [p.content_weight, p.context_weight]})
