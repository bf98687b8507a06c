"""Config of ``densevlm compare``: base, CLIPSelf, DenseVLM and DeCLIP students on the same data, one protocol.

It is the demo's config (world, zoo models, the CLIPSelf and DenseVLM stages, region and segmentation evaluation,
Talk2DINO, the toy detector) plus the DeCLIP stage and the number of training seeds. On the toy world the DeCLIP
VFM is the zoo teacher's image tower (``toy-teacher``): the toy world has no DINOv2, the VFM of the real recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from densevlm.config.align import AlignConfig, DeCLIPParams, RegionDataConfig
from densevlm.config.demo import STUDENT, DemoConfig
from densevlm.config.model import ModelSpec
from densevlm.config.talk2dino import Talk2DINOVisionConfig
from densevlm.config.train import LoopConfig, OptimConfig

TOY_VFM = "toy-teacher"  # zoo name: the stand-in VFM of the toy world


def _compare_declip() -> AlignConfig:
    """DeCLIP on the student, with the demo's CLIPSelf schedule (same data, crops, steps and learning rate)."""
    return AlignConfig(
        method="declip",
        student=ModelSpec(name=STUDENT, dense_last_block="qq"),
        teacher=None,
        unlocked_blocks=-1,
        ensemble_alpha=0.7,
        declip=DeCLIPParams(mode="qq", content_weight=1.0, context_weight=0.1,
                            vfm=Talk2DINOVisionConfig(family="clip", name=TOY_VFM, last_block="standard")),
        data=RegionDataConfig(image_size=192, max_boxes=12, crop_size=0),
        loop=LoopConfig(epochs=1, max_steps=125, batch_size=16, num_workers=2, log_every=10, eval_every=0),
        optim=OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=20),
    )


@dataclass
class CompareConfig(DemoConfig):
    """``seeds``: training seeds per method (loop.seed + 0..seeds-1); ``talk2dino``: the Talk2DINO column of the
    segmentation table (on the base student's frozen backbone); ``detection``: AP50-novel per student where
    detectron2 is installed (``with_detection``)."""

    output_dir: str = "runs/compare"
    declip: AlignConfig = field(default_factory=_compare_declip)
    seeds: int = 3
    with_talk2dino: bool = True
    with_detection: bool = False

    def validate(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds: expected a number of training seeds >= 1, got {self.seeds}")
