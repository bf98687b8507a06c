"""Config of open-vocabulary detection (``densevlm det train|eval``): an F-ViT-style detector in detectron2.

The frozen tuned backbone gives the pyramid (``densevlm.integrations.detectron2``), detectron2 adds FPN, RPN and a
box head whose classifier is the class text embeddings; at test time F-ViT's VLM branch (RoIAlign 1x1 on the dense
CLIP map) is fused with the detector's scores. The values here are translated into detectron2's own config by
``densevlm.integrations.detectron2.detector.detectron2_config``; ``detectron2`` (a list of ``KEY VALUE`` pairs)
reaches any other detectron2 key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from densevlm.config.core import ConfigError

#: CLIP's image statistics (x255), which open_clip / EVA-CLIP models are trained with.
CLIP_PIXEL_MEAN = [122.7709383, 116.7460125, 104.09373615]
CLIP_PIXEL_STD = [68.5005327, 66.6321579, 70.3231630]


@dataclass
class DetBackboneConfig:
    """The frozen backbone (``MODEL.DENSEVLM.*``): what ``densevlm export --model`` takes, and F-ViT's pyramid.

    ``model``: a run directory, a weights file, a local-dir export or a zoo / open_clip name. ``name``: the
    architecture of a weights file that does not say it. ``out_indices``: blocks feeding res2..res5 (F-ViT:
    [3, 5, 7, 11] for B/16; empty = the last block of each quarter). ``pixel_mean`` / ``pixel_std``: 0-255 RGB
    statistics the images are normalised with (CLIP's by default; F-ViT's configs use ImageNet's).
    """

    model: str = ""
    name: str = ""
    out_indices: list[int] = field(default_factory=list)
    token_stride: int = 16
    frozen: bool = True
    pixel_mean: list[float] = field(default_factory=lambda: list(CLIP_PIXEL_MEAN))
    pixel_std: list[float] = field(default_factory=lambda: list(CLIP_PIXEL_STD))

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("backbone.model: required (a run directory, weights file or zoo name), got ''")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ConfigError(f"backbone.pixel_mean / pixel_std: expected 3 values each (std > 0), got "
                              f"{self.pixel_mean} / {self.pixel_std}")


@dataclass
class DetDataConfig:
    """The open-vocabulary split, registered in detectron2's catalogs.

    ``kind``: "ovcoco" (COCO 2017, 48 base / 17 novel; the annotation files come from
    ``tools/make_ovcoco_annotations.py``) or "toyworld" (a ``densevlm toyworld`` root; its novel flags). Paths are
    relative to ``root``. ``novel_in_train``: what a novel-class annotation in the training json does: "error"
    stops naming it (OV-COCO: the base-only file must hold none), "drop" removes it at load time (the toy world
    writes every class; its images stay, unlabelled for novel objects, as in OV-COCO's base file).
    ``max_train_images`` / ``max_val_images``: the first N images only (null: all; for quick checks).
    """

    kind: Literal["ovcoco", "toyworld"] = "ovcoco"
    root: str = "datasets/coco"
    train_json: str = "annotations/instances_train2017_ovcoco_base.json"
    train_images: str = "train2017"
    val_json: str = "annotations/instances_val2017_ovcoco_all.json"
    val_images: str = "val2017"
    novel_in_train: Literal["error", "drop"] = "error"
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None

    def validate(self) -> None:
        for key in ("max_train_images", "max_val_images"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key}: expected null or an integer >= 1, got {value}")
        if not self.root:
            raise ConfigError("data.root: required, got ''")


@dataclass
class DetHeadConfig:
    """FPN, RPN and the open-vocabulary box head.

    The classifier is ``temperature * cos(box feature, class text embedding)`` with a learned temperature
    (``learned_temperature`` is its start) and a learned background embedding (``learn_background``; else a fixed
    zero-logit background). Training uses the base columns only; at test time every class is scored and, with
    ``vlm_branch``, fused geometrically with the dense CLIP map's RoIAlign-1x1 scores (temperature
    ``vlm_temperature``): ``p^(1-alpha) * p_vlm^alpha`` on base classes and background, ``beta`` on novel ones.
    ``templates``: prompt set for the class embeddings; ``class_embeddings``: a precomputed ``.safetensors`` /
    ``.npy`` (one row per class, in the dataset's category order) used instead of the backbone's text tower.
    """

    fpn_channels: int = 256
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 1000
    rpn_post_nms_topk_test: int = 1000
    roi_batch_size_per_image: int = 512
    num_conv: int = 4
    conv_dim: int = 256
    fc_dim: int = 1024
    norm: str = "GN"
    learned_temperature: float = 50.0
    learn_background: bool = True
    vlm_branch: bool = True
    vlm_temperature: float = 75.0
    alpha: float = 0.1
    beta: float = 0.8
    templates: str = "vild"
    class_embeddings: Optional[str] = None
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    detections_per_image: int = 100

    def validate(self) -> None:
        for key in ("alpha", "beta"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"head.{key}: expected a fusion exponent in [0, 1], got {getattr(self, key)}")
        for key in ("learned_temperature", "vlm_temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"head.{key}: expected a positive temperature, got {getattr(self, key)}")
        if not self.anchor_sizes or min(self.anchor_sizes) < 1:
            raise ConfigError(f"head.anchor_sizes: expected one positive size per FPN level, got {self.anchor_sizes}")


@dataclass
class DetInputConfig:
    """Resize so the image fits ``train_size`` x ``train_size`` keeping its aspect ratio (F-ViT's 640 for OV-COCO),
    random horizontal flips in training; ``test_size`` the same at test time."""

    train_size: int = 640
    test_size: int = 640
    random_flip: bool = True

    def validate(self) -> None:
        for key in ("train_size", "test_size"):
            if getattr(self, key) < 32:
                raise ConfigError(f"input.{key}: expected an integer >= 32, got {getattr(self, key)}")


@dataclass
class DetSolverConfig:
    """``epochs`` over the training images (after detectron2 drops images without annotations) set the iterations
    unless ``max_iter`` is given. AdamW by default (F-ViT's OV-COCO recipe); ``lr_decay_epochs``: epochs at which
    the learning rate is multiplied by ``gamma``; ``clip_grad``: max gradient norm (null: none)."""

    epochs: float = 3.0
    max_iter: Optional[int] = None
    ims_per_batch: int = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.1
    momentum: float = 0.9
    warmup_iters: int = 250
    lr_decay_epochs: list[float] = field(default_factory=list)
    gamma: float = 0.1
    clip_grad: Optional[float] = None
    amp: bool = False
    checkpoint_period: int = 0

    def validate(self) -> None:
        if self.max_iter is None and self.epochs <= 0:
            raise ConfigError(f"solver.epochs: expected > 0 (or solver.max_iter), got {self.epochs}")
        if self.max_iter is not None and self.max_iter < 1:
            raise ConfigError(f"solver.max_iter: expected null or an integer >= 1, got {self.max_iter}")
        if self.ims_per_batch < 1:
            raise ConfigError(f"solver.ims_per_batch: expected an integer >= 1, got {self.ims_per_batch}")
        if self.lr <= 0:
            raise ConfigError(f"solver.lr: expected > 0, got {self.lr}")
        if self.checkpoint_period < 0:
            raise ConfigError(f"solver.checkpoint_period: expected iterations >= 0 (0: at the end), got "
                              f"{self.checkpoint_period}")


@dataclass
class DetectionConfig:
    """``densevlm det train|eval``.

    ``weights``: a detector checkpoint (``model_final.pth`` of a run) to evaluate, or to start training from.
    ``eval_period``: evaluate every N iterations during training (0: at the end only).
    ``device``: "auto" (CUDA when available), "cpu" or "cuda"; ``num_gpus``: processes launched by detectron2's
    ``launch`` (one per GPU); ``threads``: torch CPU threads per process (null: torch's default; on a busy small
    CPU one thread is often faster for this model's many small ops). ``detectron2``: extra detectron2 config as ``[KEY, VALUE, ...]`` (``merge_from_list``),
    applied last, for keys this config does not name.
    """

    output_dir: str = "runs/det"
    backbone: DetBackboneConfig = field(default_factory=DetBackboneConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    input: DetInputConfig = field(default_factory=DetInputConfig)
    head: DetHeadConfig = field(default_factory=DetHeadConfig)
    solver: DetSolverConfig = field(default_factory=DetSolverConfig)
    weights: str = ""
    eval_period: int = 0
    num_workers: int = 4
    device: str = "auto"
    num_gpus: int = 1
    threads: Optional[int] = None
    seed: int = 0
    detectron2: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir: required, got ''")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.num_gpus < 1:
            raise ConfigError(f"num_gpus: expected an integer >= 1, got {self.num_gpus}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: expected an integer >= 0, got {self.num_workers}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: expected null or an integer >= 1, got {self.threads}")
        if len(self.detectron2) % 2:
            raise ConfigError(f"detectron2: expected KEY VALUE pairs, got an odd list {self.detectron2}")


def toy_detection_config() -> DetectionConfig:
    """The toy recipe (``configs/det/toy.yaml``; the demo's detection stage): F-ViT at toy scale on a CPU.

    Paths (``output_dir``, ``data.root``) and ``backbone.model`` are filled in by the caller.
    """
    return DetectionConfig(
        output_dir="runs/det/toy",
        backbone=DetBackboneConfig(model="toy-student", out_indices=[1, 2, 3, 5]),
        data=DetDataConfig(kind="toyworld", root="data/toyworld", train_json="annotations/instances_train.json",
                           train_images="images/train", val_json="annotations/instances_val.json",
                           val_images="images/val", novel_in_train="drop"),
        input=DetInputConfig(train_size=192, test_size=192),
        head=DetHeadConfig(fpn_channels=64, anchor_sizes=[16, 32, 64, 128, 256], rpn_pre_nms_topk_train=600,
                           rpn_pre_nms_topk_test=300, rpn_post_nms_topk_train=256, rpn_post_nms_topk_test=100,
                           roi_batch_size_per_image=128, num_conv=0, fc_dim=256, templates="short"),
        solver=DetSolverConfig(epochs=6, ims_per_batch=8, lr=5e-4, weight_decay=0.05, warmup_iters=50,
                               lr_decay_epochs=[5]),
        num_workers=2,
    )
