"""Contrastive image-text pre-training: symmetric InfoNCE with a learnable temperature (CLIP)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from densevlm.methods.base import ObjectiveOutput


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather features from every process, keeping the gradient path of the local shard."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _clip_forward(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return image, text, model.logit_scale


class ContrastiveObjective:
    """CLIP's loss over the global batch: every process sees all processes' features as negatives."""

    max_logit_scale = 100.0  # as in CLIP: the temperature never goes below 0.01

    def prepare(self, device: torch.device) -> None:
        return None

    def __call__(self, step_model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        image, text, logit_scale = step_model(_clip_forward, batch["images"], batch["tokens"])
        all_image, all_text = _gather_with_grad(image), _gather_with_grad(text)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        scale = logit_scale.exp().clamp(max=self.max_logit_scale)
        logits_i = scale * image @ all_text.t()
        logits_t = scale * text @ all_image.t()
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        loss = 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))
        with torch.no_grad():
            acc = (logits_i.argmax(-1) == labels).float().mean().item()
        return ObjectiveOutput(loss, {"batch_acc": acc, "logit_scale": float(scale.detach())})

    @staticmethod
    def clamp_logit_scale(model: nn.Module) -> None:
        """Keep the learnable temperature in CLIP's range after each step."""
        with torch.no_grad():
            model.logit_scale.clamp_(0, torch.log(torch.tensor(ContrastiveObjective.max_logit_scale)).item())
