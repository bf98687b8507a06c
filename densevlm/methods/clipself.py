"""CLIPSelf: align each grid box's dense feature with the CLS embedding of its image crop under a frozen teacher.

loss = mean over valid boxes of 1 - cos(student RoI feature, teacher CLS embedding of the box crop); the teacher
is a frozen copy of the initial student (METHOD_DENSEVLM.md §1.5).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.methods.base import ObjectiveOutput
from densevlm.methods.regions import per_image_boxes, region_args, student_region_features


class CLIPSelfObjective:
    """See the module docstring. Batches must carry ``crops`` (the dataset builds them only for CLIPSelf)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher

    def prepare(self, device: torch.device) -> None:
        self.teacher.to(device).eval().requires_grad_(False)

    def __call__(self, step_model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        if "crops" not in batch:
            raise KeyError("CLIPSelf needs box crops in the batch; build the dataset with crop_size set")
        valid = batch["valid"]
        boxes = per_image_boxes(batch["boxes"], valid)
        with torch.no_grad():
            target = F.normalize(self.teacher.encode_image(batch["crops"][valid]).float(), dim=-1)
        student = F.normalize(step_model(student_region_features, *region_args(batch, boxes)).float(), dim=-1)
        cos = (student * target).sum(-1)
        loss = (1.0 - cos).mean() if len(cos) else student.sum() * 0.0
        return ObjectiveOutput(loss, {"cosine": float(cos.detach().mean()) if len(cos) else 0.0})
