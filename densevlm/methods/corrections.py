"""Reviewed teacher labels as DenseVLM's targets: an input of the objective (the task layer reads the file).

:class:`TargetCorrections` holds, per region ``(image index, slot)`` (the dataset's ``index`` and ``cells``), the
class a reviewer gave it or :data:`DELETED`, and the class rules as vocabulary-sized maps. Applied to a batch's
teacher logits (cos / T over the vocabulary):

- class rules first, on every region: ``merge`` moves each class's probability onto its target class, ``never``
  removes a class's probability (the rest renormalised; a region left with none is dropped);
- a corrected region's row becomes its class, one-hot (as logits: 0 for the class, :data:`NEG` elsewhere, so the
  KL is exactly ``-log q_c``), so it passes the threshold and is routed by that class's thing/stuff flag;
- a deleted region is dropped;
- every other region keeps the teacher's distribution: without rules its logits are not touched at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

#: The class of a region the reviewer deleted.
DELETED = -1
#: A one-hot row's logit for the other classes: exp(NEG) is exactly 0 in float32, and NEG stays finite so that
#: 0 * (NEG - s) is 0 in the KL (an infinite logit would make it NaN).
NEG = -1.0e4


@dataclass
class TargetCorrections:
    """See the module docstring.

    labels: ``(image index, slot)`` -> class index in the training vocabulary, or :data:`DELETED`.
    merge: (N,) long, class j's probability goes to class ``merge[j]``; None = no merge rule.
    never: (N,) bool, classes never predicted; None = no such rule.
    """

    labels: dict[tuple[int, int], int] = field(default_factory=dict)
    merge: Optional[torch.Tensor] = None
    never: Optional[torch.Tensor] = None

    def region_labels(self, batch: dict[str, Any]) -> torch.Tensor:
        """(R,) the corrected class of each valid region of ``batch`` (``per_image_boxes`` order), -2 where the
        region is not corrected, :data:`DELETED` where it was deleted."""
        out = []
        valid = batch["valid"].cpu()
        cells = batch["cells"].cpu()
        for i, image in enumerate(torch.as_tensor(batch["index"]).cpu().tolist()):
            for slot in cells[i][valid[i]].tolist():
                out.append(self.labels.get((image, slot), -2))
        return torch.tensor(out, dtype=torch.long)

    def apply_rules(self, t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits after the class rules, rows left with no probability). Without rules: the logits as given."""
        empty = torch.zeros(len(t_logits), dtype=torch.bool, device=t_logits.device)
        if self.merge is None and self.never is None:
            return t_logits, empty
        probs = t_logits.float().softmax(-1)
        if self.merge is not None:
            merged = torch.zeros_like(probs)
            merged.index_add_(1, self.merge.to(probs.device), probs)
            probs = merged
        if self.never is not None:
            probs = probs.masked_fill(self.never.to(probs.device), 0.0)
        total = probs.sum(-1, keepdim=True)
        empty = total.squeeze(-1) <= 0
        probs = probs / total.clamp_min(1e-30)
        return torch.log(probs).clamp_min(NEG), empty

    def adjust(self, batch: dict[str, Any], t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(teacher logits with the corrections, (R,) bool rows to drop, how many rows were set one-hot)."""
        t_logits, drop = self.apply_rules(t_logits)
        labels = self.region_labels(batch).to(t_logits.device)
        corrected = labels >= 0
        if bool(corrected.any()):
            one_hot = torch.full_like(t_logits[corrected], NEG)
            one_hot.scatter_(1, labels[corrected].view(-1, 1), 0.0)
            t_logits = t_logits.clone()
            t_logits[corrected] = one_hot
            drop = drop & ~corrected
        drop = drop | (labels == DELETED)
        return t_logits, drop, int(corrected.sum())
