"""Config of ``densevlm demo``: the whole pipeline on the toy world, stage by stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from densevlm.config.pretrain import PretrainConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.config.train import LoopConfig, OptimConfig


def _demo_pretrain() -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.loop = LoopConfig(epochs=6, batch_size=128, eval_every=0, num_workers=2, log_every=5)
    cfg.optim = OptimConfig(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, warmup_steps=50)
    return cfg


@dataclass
class DemoConfig:
    """Stages write into ``output_dir``; data paths inside the stage configs are filled in by the demo."""

    output_dir: str = "runs/demo"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    pretrain: PretrainConfig = field(default_factory=_demo_pretrain)
    grid_images: int = 8  # images in the toy-world contact sheet
