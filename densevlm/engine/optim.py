"""AdamW parameter groups and the cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from densevlm.config.train import OptimConfig


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: no decay on 1-D tensors (norms, biases, gains), norm layers, logit_scale and tokens."""
    lowered = name.lower()
    return (
        param.ndim < 2
        or "bias" in lowered
        or "norm" in lowered
        or ".ln" in lowered
        or lowered.startswith("ln")
        or "logit_scale" in lowered
        or "cls_token" in lowered
        or "class_embedding" in lowered
        or "pos_embed" in lowered
        or "positional_embedding" in lowered
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters; check the freezing policy (unlocked_blocks)")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    # Warm-up longer than the run (tiny profiles) is capped so the schedule still decays.
    warmup = min(cfg.warmup_steps, max(0, total_steps // 2))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, cfg.min_lr_ratio)
    )
