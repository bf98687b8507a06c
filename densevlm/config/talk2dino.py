"""Configs of Talk2DINO: the frozen vision backbone, the feature cache, ψ's training and the segmenter.

The defaults are the released recipe (``configs/vitb_mlp_infonce.yaml`` of the reference): DINOv2 ViT-B/14 with
registers at 448 px (resize + centre crop), CLIP ViT-B/16 (OpenAI) text, Adam at lr 1e-4 without a schedule,
batch 128, 100 epochs, τ = 0.07 fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from densevlm.config.core import ConfigError
from densevlm.config.model import ModelSpec
from densevlm.config.train import LoopConfig, OptimConfig


@dataclass
class Talk2DINOVisionConfig:
    """The frozen vision backbone whose patch space ψ maps into.

    ``family``: "dinov2" builds ``name`` through timm (``vit_base_patch14_reg4_dinov2``,
    ``vit_large_patch14_reg4_dinov2``, or the torch.hub names ``dinov2_vitb14_reg`` / ``dinov2_vitl14_reg``) with
    ``pretrained`` = a local weights file (original DINOv2 or timm layout), "timm" (timm's hub) or null (random
    init); "clip" takes the visual tower of our model factory: ``name`` / ``pretrained`` as a :class:`ModelSpec`
    (a zoo name, a run directory, an open_clip name and weights).
    ``last_block`` ("clip" only): "standard" tokens of the last block as it is, or "value" (its value path, the
    dense path CLIPSelf/DenseVLM align).
    ``timm_kwargs`` ("dinov2" only): extra ``timm.create_model`` arguments (a small random model for tests).
    """

    family: Literal["dinov2", "clip"] = "dinov2"
    name: str = "vit_base_patch14_reg4_dinov2"
    pretrained: Optional[str] = None
    last_block: Literal["standard", "value"] = "standard"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name and not (self.family == "clip" and self.pretrained):
            raise ConfigError("vision.name: required (a timm DINOv2 name, or a model of our factory)")
        if self.timm_kwargs and self.family != "dinov2":
            raise ConfigError("vision.timm_kwargs: only for family 'dinov2'")


@dataclass
class Talk2DINOCaptionsConfig:
    """Any COCO-captions json (COCO 2014 for the recipe) and the folder its ``file_name`` entries are in.

    Images are resized (bicubic) so the short side is ``image_size`` and centre-cropped to a square, as the
    reference extraction (448 px: a 32x32 grid of 14-px patches). ``max_images``: the first N images only.
    """

    captions_json: str = ""
    image_root: str = ""
    image_size: int = 448
    max_images: Optional[int] = None

    def validate(self) -> None:
        if self.image_size < 1:
            raise ConfigError(f"data.image_size: expected an integer >= 1, got {self.image_size}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"data.max_images: expected null or an integer >= 1, got {self.max_images}")


@dataclass
class FeatureCacheConfig:
    """Where and how the frozen encoders' features are cached (safetensors shards + a manifest).

    ``dir``: the cache folder (empty: ``<output_dir>.cache``, beside the run directory). A cache made by another backbone, text model, image
    size or captions file is refused (the message names what differs); ``rebuild`` replaces it.
    ``dtype``: storage type of the image features (float16 halves the disk and memory of COCO-size caches).
    """

    dir: str = ""
    batch_size: int = 32
    shard_size: int = 4096
    dtype: Literal["float16", "float32"] = "float16"
    num_workers: int = 4
    device: str = "auto"
    rebuild: bool = False

    def validate(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1 or self.num_workers < 0:
            raise ConfigError(f"cache: batch_size and shard_size must be >= 1 and num_workers >= 0, got "
                              f"{self.batch_size}, {self.shard_size}, {self.num_workers}")


@dataclass
class Talk2DINOTrainConfig:
    """``densevlm talk2dino cache|train``: cache both frozen encoders' features once, then train ψ from the cache.

    ``text``: the CLIP whose text tower embeds captions and class names (the recipe: OpenAI ViT-B/16, EOT token
    after ``text_projection``); ψ maps its ``embed_dim`` to the backbone's token width.
    ``temperature``: InfoNCE τ, fixed (the reference's learnable scale never reaches its optimiser).
    """

    output_dir: str = "runs/talk2dino"
    vision: Talk2DINOVisionConfig = field(default_factory=Talk2DINOVisionConfig)
    text: ModelSpec = field(default_factory=lambda: ModelSpec(name="ViT-B-16-quickgelu", pretrained="openai"))
    data: Talk2DINOCaptionsConfig = field(default_factory=Talk2DINOCaptionsConfig)
    cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    temperature: float = 0.07
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=100, batch_size=128, num_workers=0, seed=123, log_every=50, eval_every=0, checkpoint_every=5))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, warmup_steps=0, min_lr_ratio=1.0))

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature: expected > 0, got {self.temperature}")
        if not self.output_dir:
            raise ConfigError("output_dir: required, got an empty string")


@dataclass
class Talk2DINOSegmenterConfig:
    """The Talk2DINO segmenter of ``densevlm eval semseg`` (``segmenter: talk2dino``).

    ``psi``: a ``densevlm talk2dino train`` run directory (its config names the backbone and the text model) or a
    ψ weights file (released ``.pth`` or ``.safetensors``; then ``vision`` and the eval config's ``model`` say the
    backbone and the CLIP text model).
    ``vision``: the backbone; null = the run directory's.
    ``bg_clean``: the attention-based background cleaning, mixing ``lambda_bg`` of each class's head-weighted
    attention map into its mask (the reference turns it on for VOC-21 and COCO-Object only).
    ``pamr``: pixel-adaptive mask refinement of the upsampled masks (10 iterations, dilations 1-24, as released;
    the released README numbers use it).
    """

    psi: str = ""
    vision: Optional[Talk2DINOVisionConfig] = None
    bg_clean: bool = False
    lambda_bg: float = 0.2
    pamr: bool = False

    def validate(self) -> None:
        if self.lambda_bg < 0:
            raise ConfigError(f"talk2dino.lambda_bg: expected >= 0, got {self.lambda_bg}")


@dataclass
class DemoTalk2DINOConfig:
    """``densevlm demo talk2dino``: ψ trained on the toy captions, then toy-val segmentation beside dense CLIP.

    ``backbone``: the zoo model (or run directory) whose visual tower is the frozen backbone and whose text tower
    embeds the captions. The toy world has no DINOv2, so a contrastively pre-trained, never dense-tuned toy CLIP
    stands in for it: toy-student, the demo's base model, so Talk2DINO and dense CLIP are compared on the very
    backbone the main demo's "base" row scores (and it extracts 4-5x faster than toy-teacher on a CPU); a
    DenseVLM run directory (``runs/demo/densevlm``) puts the tuned backbone under Talk2DINO.
    ``max_images``: train images whose features are cached (null: all).
    """

    backbone: str = "toy-student"
    last_block: Literal["standard", "value"] = "standard"
    max_images: Optional[int] = 2000
    temperature: float = 0.07
    bg_clean: bool = False
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=20, batch_size=128, num_workers=0, seed=123, log_every=20, eval_every=0, checkpoint_every=20,
        cpu=True))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0))
