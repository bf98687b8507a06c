"""Config of ``densevlm demo``: the whole pipeline on the toy world, stage by stage, from the model zoo.

The student starts from the shipped student-size toy CLIP and DenseVLM's teacher is the shipped CLIPSelf-tuned
teacher-size toy CLIP (the paper's setting: a strong P-VLM teacher, a smaller student), as real users start from
downloaded checkpoints. ``--from-scratch`` re-makes both from the zoo recipes first (``zoo_build`` below).
Data paths and the links between stages are filled in by the demo; everything else is a recipe value here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from densevlm.config.align import AlignConfig, DenseVLMParams, RegionDataConfig
from densevlm.config.demo_labels import DemoLabelsConfig
from densevlm.config.detection import DetectionConfig, toy_detection_config
from densevlm.config.evaluation import RegionTextConfig
from densevlm.config.model import ModelSpec
from densevlm.config.semseg import SemSegInferenceConfig
from densevlm.config.talk2dino import DemoTalk2DINOConfig
from densevlm.config.toyworld import ToyWorldConfig
from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.config.vocab import TextEmbeddingConfig

STUDENT = "toy-student"  # zoo names (densevlm/zoo/weights/manifest.json)
TEACHER = "toy-teacher-clipself"


def _demo_clipself() -> AlignConfig:
    """CLIPSelf on the student: the baseline DenseVLM is compared with."""
    return AlignConfig(
        method="clipself",
        student=ModelSpec(name=STUDENT),
        teacher=None,
        unlocked_blocks=-1,
        ensemble_alpha=0.7,
        data=RegionDataConfig(image_size=192, max_boxes=12, crop_size=0),
        loop=LoopConfig(epochs=1, max_steps=125, batch_size=16, num_workers=2, log_every=10, eval_every=0),
        optim=OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=20),
    )


def _demo_densevlm() -> AlignConfig:
    text = TextEmbeddingConfig(templates="short")
    return AlignConfig(
        method="densevlm",
        student=ModelSpec(name=STUDENT),
        teacher=ModelSpec(name=TEACHER),
        student_text=text,
        teacher_text=text,
        exclude_novel=True,  # open-vocabulary protocol: novel classes are never named during alignment
        densevlm=DenseVLMParams(temperature=0.01, threshold=0.3),
        unlocked_blocks=-1,
        ensemble_alpha=0.9,
        data=RegionDataConfig(image_size=192, max_boxes=36),
        loop=LoopConfig(epochs=1, max_steps=125, batch_size=16, num_workers=2, log_every=10, eval_every=0),
        optim=OptimConfig(lr=1e-4, weight_decay=0.1, warmup_steps=20),
    )


def _demo_detection() -> DetectionConfig:
    """``demo detection``: the toy detector recipe (configs/det/toy.yaml) for a fixed number of iterations on the
    demo world (its 4000 training images would make 6 epochs too long for a CPU stage), scored on 200 val images."""
    cfg = toy_detection_config()
    cfg.solver.max_iter = 300
    cfg.solver.lr_decay_epochs = []
    cfg.data.max_val_images = 200
    cfg.threads = 1  # small ops: a second thread gained little on 2 cores and cost 10x when the CPU was busy
    return cfg


@dataclass
class DemoEvalConfig:
    """Region classification of base, CLIPSelf, DenseVLM and the teacher on toy val (seen and novel classes)."""

    image_size: int = 192
    text: RegionTextConfig = field(default_factory=lambda: RegionTextConfig(templates="short"))
    max_images: int | None = None
    batch_size: int = 16


@dataclass
class DemoSemSegConfig:
    """Training-free semantic segmentation (dense CLIP) of every model on toy val: mIoU over all, seen, novel."""

    inference: SemSegInferenceConfig = field(
        default_factory=lambda: SemSegInferenceConfig(short_side=192, max_long_side=None, mode="whole", batch_size=16))
    templates: str = "short"
    figures: int = 4  # prediction overlays per model
    max_images: int | None = None


@dataclass
class ZooBuildConfig:
    """``--from-scratch``: how the zoo recipes run (recipe values stay as in configs/; overrides for tests)."""

    workers: int = 2
    world_overrides: list[str] = field(default_factory=list)
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class DemoConfig:
    """Stages write into ``output_dir``; data paths inside the stage configs are filled in by the demo."""

    output_dir: str = "runs/demo"
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    student: str = STUDENT  # zoo name of the student's starting point (base model)
    teacher: str = TEACHER  # zoo name of DenseVLM's teacher
    clipself: AlignConfig = field(default_factory=_demo_clipself)
    densevlm: AlignConfig = field(default_factory=_demo_densevlm)
    eval: DemoEvalConfig = field(default_factory=DemoEvalConfig)
    semseg: DemoSemSegConfig = field(default_factory=DemoSemSegConfig)
    zoo_build: ZooBuildConfig = field(default_factory=ZooBuildConfig)
    talk2dino: DemoTalk2DINOConfig = field(default_factory=DemoTalk2DINOConfig)  # `densevlm demo talk2dino`
    detection: DetectionConfig = field(default_factory=_demo_detection)  # `densevlm demo detection` only
    labels: DemoLabelsConfig = field(default_factory=DemoLabelsConfig)  # `densevlm demo labels` only
    grid_images: int = 8  # images in the toy-world contact sheet
