"""AdamW parameter groups and the cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn

from densevlm.config.train import OptimConfig
from densevlm.models.tuning import param_groups_for_adamw


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases, gains, logit_scale, tokens."""
    groups = param_groups_for_adamw(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters; check the freezing policy (unlocked_blocks)")
    # The fused kernel is 2-3x faster than the per-tensor loop on CPU (measured on the toy CLIP) and on GPU.
    params = [p for g in groups for p in g["params"]]
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


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
