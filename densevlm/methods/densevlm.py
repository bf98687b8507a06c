"""DenseVLM: teacher-retrieved categories for unlabelled regions, with decoupled thing / stuff alignment.

Per batch (METHOD_DENSEVLM.md §1.4-1.5):
1. the frozen teacher pools its dense map over every valid grid box and scores it against its own text
   embeddings: p_T = softmax(cos / T) over the training vocabulary (T = 0.01);
2. a region is kept when max p_T > threshold (0.3), and is a thing or stuff region by the vocabulary's flag of
   its arg-max class (flags are data: no index boundary, so no off-by-one);
3. the student's region features are scored against the STUDENT's text embeddings the same way;
4. loss = KL(p_T || p_S) over the thing columns for thing regions + KL over all columns for stuff regions, each
   averaged over its own group of regions.
A batch where no region passes contributes an exact zero loss (with a graph, so DDP still all-reduces) and is
counted; it never produces NaN.

Where the teacher's region features come from is injected (:mod:`densevlm.methods.teacher_targets`): the online
teacher, a teacher-target cache (the batch carries ``teacher_features``, the teacher's normalised region features
of the drawn cells, and step 1 is a look-up: the teacher is not run, and unless some images are missing from the
cache not even built), or the lazy mode that fills the cache. The objective itself does no file I/O.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.methods.base import ObjectiveOutput
from densevlm.methods.regions import per_image_boxes, student_region_features
from densevlm.methods.teacher_targets import (RegionFeatures, TeacherRegionTargets, TeacherTargets,
                                              as_teacher_targets)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student), mean over rows (``F.kl_div(..., reduction='batchmean')``); a class of zero teacher
    probability (logit -inf, as compact targets with no tail have) contributes 0, not 0 * inf = NaN."""
    t = F.log_softmax(teacher_logits, -1)
    terms = t.exp() * (t - F.log_softmax(student_logits, -1))
    return torch.where(torch.isneginf(t), 0.0, terms).sum() / max(1, t.shape[0])


class DenseVLMObjective:
    """See the module docstring.

    Args:
        teacher: the teacher's region features, a :class:`~densevlm.methods.teacher_targets.TeacherTargets`; a
            frozen P-VLM (a :class:`~densevlm.models.DenseCLIP`) or None stands for the online teacher that also
            reads cached features from batches carrying them (None: every batch must bring them).
        teacher_text, student_text: (N, D_T) and (N, D_S) unit-norm class embeddings of the SAME vocabulary
            (same classes in the same order), each in its own model's text space.
        thing_mask: (N,) bool, True for thing classes.
        temperature: logits are cos / temperature (the reference's fixed 0.01, not the learned logit_scale).
        threshold: keep a region when the teacher's max probability exceeds this.
        teacher_autocast: with a module as ``teacher``, run its forward under autocast to this dtype (the
            training precision; the student's forward gets it from accelerate), None for full precision.
    """

    def __init__(self, teacher: Optional[nn.Module | TeacherTargets], teacher_text: torch.Tensor,
                 student_text: torch.Tensor, thing_mask: torch.Tensor, *, temperature: float = 0.01,
                 threshold: float = 0.3, teacher_autocast: Optional[torch.dtype] = None) -> None:
        if teacher_text.shape[0] != student_text.shape[0] or teacher_text.shape[0] != thing_mask.shape[0]:
            raise ValueError(f"teacher ({teacher_text.shape[0]}), student ({student_text.shape[0]}) text embeddings "
                             f"and thing mask ({thing_mask.shape[0]}) must cover the same vocabulary")
        if not thing_mask.any():
            raise ValueError("the training vocabulary has no thing class; DenseVLM's thing alignment needs some")
        self.targets = as_teacher_targets(teacher, teacher_autocast)
        self.teacher_text = F.normalize(teacher_text.float(), dim=-1)
        self.student_text = F.normalize(student_text.float(), dim=-1)
        self.thing_mask = thing_mask.bool()
        self.temperature, self.threshold = temperature, threshold

    def prepare(self, device: torch.device) -> None:
        self.targets.prepare(device)
        self.teacher_text = self.teacher_text.to(device)
        self.student_text = self.student_text.to(device)
        self.thing_mask = self.thing_mask.to(device)

    def logits_of_teacher_features(self, feats: torch.Tensor) -> torch.Tensor:
        return RegionFeatures(feats, 0).logits(self.teacher_text, self.temperature)

    @torch.no_grad()
    def batch_teacher_targets(self, batch: dict[str, Any], boxes: list[torch.Tensor]) -> TeacherRegionTargets:
        """The teacher's targets of the batch's valid boxes, in ``per_image_boxes`` order (from the injected
        :class:`~densevlm.methods.teacher_targets.TeacherTargets`): features or a class distribution."""
        return self.targets.targets(batch, boxes)

    def loss_from_logits(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The decoupled KL given teacher and student logits over the vocabulary for the same regions."""
        probs = t_logits.softmax(-1)
        conf, label = probs.max(-1)
        keep = conf > self.threshold
        is_thing = self.thing_mask[label] & keep
        is_stuff = ~self.thing_mask[label] & keep
        n_thing, n_stuff = int(is_thing.sum()), int(is_stuff.sum())
        # Zero with a graph through the student: DDP needs every rank to backpropagate, even an empty one.
        loss = s_logits.sum() * 0.0
        if n_thing:
            cols = self.thing_mask
            loss = loss + _kl(t_logits[is_thing][:, cols], s_logits[is_thing][:, cols])
        if n_stuff:
            loss = loss + _kl(t_logits[is_stuff], s_logits[is_stuff])
        total = max(1, len(conf))
        metrics = {"kept_fraction": (n_thing + n_stuff) / total, "thing_regions": float(n_thing),
                   "stuff_regions": float(n_stuff), "teacher_conf": float(conf.mean()) if len(conf) else 0.0,
                   "empty_batch": float(n_thing + n_stuff == 0)}
        return loss, metrics

    def __call__(self, step_model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        images = batch["image"]
        boxes = per_image_boxes(batch["boxes"], batch["valid"])
        targets = self.batch_teacher_targets(batch, boxes)
        t_logits = targets.logits(self.teacher_text, self.temperature)
        s_feats = step_model(student_region_features, images, boxes)
        s_logits = F.normalize(s_feats.float(), dim=-1) @ self.student_text.t() / self.temperature
        loss, metrics = self.loss_from_logits(t_logits, s_logits)
        if "cached" in batch:  # the batch was read through a target store
            metrics["teacher_online_images"] = float(targets.online_images)
        return ObjectiveOutput(loss, metrics)
