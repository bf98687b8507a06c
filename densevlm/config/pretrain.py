"""Config of contrastive image-text pre-training (``densevlm pretrain``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from densevlm.config.model import ModelSpec
from densevlm.config.train import LoopConfig, OptimConfig


@dataclass
class CaptionDataConfig:
    """Any COCO-captions-format json plus the folder its ``file_name`` entries are relative to."""

    captions_json: str = ""
    image_root: str = ""
    image_size: int = 0  # 0 = the model's native input size
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    skip_bad_images: bool = False

    def validate(self) -> None:
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {list(self.crop_scale)}")
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0, got {self.image_size}")


@dataclass
class ZeroShotConfig:
    """Image-level zero-shot check on a COCO-panoptic-format split; disabled when panoptic_json is empty."""

    panoptic_json: str = ""
    image_root: str = ""
    vocabulary: str = ""  # a vocabulary name or file; empty = the panoptic json's categories
    templates: str = "vild"
    batch_size: int = 64
    max_images: Optional[int] = None  # ``templates`` is checked by run_pretrain before anything runs


@dataclass
class PretrainConfig:
    output_dir: str = "runs/pretrain"
    model: ModelSpec = field(default_factory=lambda: ModelSpec(name="ToyCLIP-ViT-T-16"))
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    eval: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=10, batch_size=128, eval_every=0))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, warmup_steps=100)
    )
