"""Config of ``densevlm demo``: the whole pipeline on the toy world, stage by stage.

Data paths and the links between stages (the pre-trained CLIP initialises CLIPSelf and DenseVLM, the
CLIPSelf-tuned model is DenseVLM's teacher) are filled in by the demo; everything else is a recipe value here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from densevlm.config.align import AlignConfig, DenseVLMParams, RegionDataConfig
from densevlm.config.evaluation import RegionTextConfig
from densevlm.config.model import ModelSpec
from densevlm.config.pretrain import PretrainConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.config.vocab import TextEmbeddingConfig

TOY_MODEL = "ToyCLIP-ViT-T-16"


def _demo_pretrain() -> PretrainConfig:
    cfg = PretrainConfig()
    cfg.model = ModelSpec(name=TOY_MODEL)
    # 96 px is the toy CLIP's native size; batch 32 gives ~1000 steps in 8 epochs (more steps beat bigger
    # batches here: the world has 28 concepts, so a large batch is mostly false negatives).
    cfg.loop = LoopConfig(epochs=8, batch_size=32, eval_every=0, num_workers=2, log_every=20)
    cfg.optim = OptimConfig(lr=5e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, warmup_steps=100)
    return cfg


def _demo_clipself() -> AlignConfig:
    """CLIPSelf on the pre-trained toy CLIP: it becomes DenseVLM's teacher, as the paper's P-VLM is CLIPSelf-tuned."""
    return AlignConfig(
        method="clipself",
        student=ModelSpec(name=TOY_MODEL),
        teacher=None,
        unlocked_blocks=-1,
        ensemble_alpha=0.7,
        data=RegionDataConfig(image_size=192, max_boxes=12, crop_size=0),
        loop=LoopConfig(epochs=1, batch_size=16, num_workers=2, log_every=10, eval_every=0),
        optim=OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=20),
    )


def _demo_densevlm() -> AlignConfig:
    text = TextEmbeddingConfig(templates="short")
    return AlignConfig(
        method="densevlm",
        student=ModelSpec(name=TOY_MODEL),
        teacher=ModelSpec(name=TOY_MODEL),
        student_text=text,
        teacher_text=text,
        exclude_novel=True,  # open-vocabulary protocol: novel classes are never named during alignment
        densevlm=DenseVLMParams(temperature=0.01, threshold=0.3),
        unlocked_blocks=-1,
        ensemble_alpha=0.9,
        data=RegionDataConfig(image_size=192, max_boxes=36),
        loop=LoopConfig(epochs=1, batch_size=16, num_workers=2, log_every=10, eval_every=0),
        optim=OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=20),
    )


@dataclass
class DemoEvalConfig:
    """Region classification of base, CLIPSelf and DenseVLM on toy val (all seen and novel classes)."""

    image_size: int = 192
    text: RegionTextConfig = field(default_factory=lambda: RegionTextConfig(templates="short"))
    max_images: int | None = None
    batch_size: int = 16


@dataclass
class DemoConfig:
    """Stages write into ``output_dir``; data paths inside the stage configs are filled in by the demo."""

    output_dir: str = "runs/demo"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    pretrain: PretrainConfig = field(default_factory=_demo_pretrain)
    clipself: AlignConfig = field(default_factory=_demo_clipself)
    densevlm: AlignConfig = field(default_factory=_demo_densevlm)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)
    grid_images: int = 8  # images in the toy-world contact sheet
