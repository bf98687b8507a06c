"""Config of region-language alignment training (``densevlm train``): DenseVLM, CLIPSelf or DeCLIP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from densevlm.config.evaluation import PanopticDataConfig, RegionTextConfig
from densevlm.config.model import ModelSpec
from densevlm.config.regions import RegionSourceConfig
from densevlm.config.sources import ImageSourceConfig
from densevlm.config.talk2dino import Talk2DINOVisionConfig
from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.config.vocab import TextEmbeddingConfig


@dataclass
class RegionDataConfig:
    """Images (any source), resize-longest + pad to ``image_size``, regions from ``regions`` (random grid boxes by
    default; boxes or masks from a COCO file)."""

    source: ImageSourceConfig = field(default_factory=ImageSourceConfig)
    regions: RegionSourceConfig = field(default_factory=RegionSourceConfig)
    image_size: int = 512
    max_boxes: int = 0  # 0 = the method's default (DenseVLM 36, CLIPSelf 20)
    max_split: int = 6
    grid_style: Literal["auto", "densevlm", "clipself"] = "auto"  # auto = the method's own grid choices
    crop_size: int = 0  # CLIPSelf crops; 0 = the teacher's native input size
    # Shards (`densevlm shards write` makes them from `source`): a folder or fsspec URL with a manifest.json. Set,
    # training streams them (each rank and loader worker its own shards, exactly once per epoch) instead of
    # reading `source`.
    shards: str = ""
    shard_size: int = 1000  # images per shard when writing
    shard_payload: str = "none"  # what each shard stores beside its images (densevlm.data.shards.PAYLOADS)
    skip_bad_shards: bool = False  # a damaged shard: logged and its samples replaced, instead of an error

    def validate(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.max_boxes < 0 or self.max_split < 1 or self.crop_size < 0:
            raise ValueError("max_boxes and crop_size must be >= 0, max_split >= 1")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


@dataclass
class DenseVLMParams:
    temperature: float = 0.01  # logits = cos / temperature, for teacher and student (the reference's 100 x cos)
    threshold: float = 0.3  # keep a region when the teacher's max probability exceeds this

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")


DECLIP_MODES = ("qq", "kk", "vv", "csa", "all")


@dataclass
class DeCLIPParams:
    """DeCLIP (methods/declip.py): the decoupled last block's mode, the two loss weights and the frozen VFM.

    ``mode`` must equal ``student.dense_last_block`` (the tuned model's dense path is the decoupled block). The
    released scripts train ``qq`` with ``content_weight`` 1.0 and ``context_weight`` 0.1. ``vfm`` is built like
    Talk2DINO's backbone: ``family: dinov2`` (timm DINOv2 with registers; ``pretrained``: a local file, "timm", or
    "random" for a random init in tests) or ``family: clip`` (a model of our factory, e.g. the zoo's
    ``toy-teacher`` as the toy world's stand-in VFM). ``vfm_image_size``: 0 = the student's grid times the VFM's
    patch (the released proxy image, grids equal), else a fixed square input for the VFM.
    """

    mode: Literal["qq", "kk", "vv", "csa", "all"] = "qq"
    content_weight: float = 1.0
    context_weight: float = 0.1
    vfm: Talk2DINOVisionConfig = field(default_factory=lambda: Talk2DINOVisionConfig(
        family="dinov2", name="vit_base_patch14_reg4_dinov2", pretrained=None))
    vfm_image_size: int = 0

    def validate(self) -> None:
        if self.content_weight < 0 or self.context_weight < 0:
            raise ValueError(f"content_weight and context_weight must be >= 0, got {self.content_weight}, "
                             f"{self.context_weight}")
        if self.vfm_image_size < 0:
            raise ValueError(f"vfm_image_size must be >= 0 (0 = the student's grid), got {self.vfm_image_size}")


@dataclass
class TeacherTargetsConfig:
    """What DenseVLM's teacher targets are made of besides the teacher.

    kind: what the ``teacher_cache`` folder holds. ``exact``: every grid cell's teacher features (any
    vocabulary). ``compact``: every cell's top-``k`` classes of the recipe's teacher vocabulary and the tail mass
    of the rest (densevlm.methods.compact_targets; about 45x smaller for EVA02-L at k=5), bound to that
    vocabulary, templates, temperature and k.

    corrections: a corrections file written by ``densevlm labels apply`` (null: the teacher alone). A corrected
    region's target is its corrected class, one-hot, routed by that class's thing/stuff flag; a deleted region is
    dropped; the class rules (merge, never) reshape every other region's teacher distribution.
    """

    kind: Literal["exact", "compact"] = "exact"
    k: int = 5  # compact: classes kept per cell, in [1, vocabulary size]
    corrections: Optional[str] = None

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"teacher_targets.k must be >= 1, got {self.k}")


@dataclass
class PeriodicEvalConfig:
    """Region classification during training (the six reference keys); disabled when data.panoptic_json is empty."""

    data: PanopticDataConfig = field(default_factory=PanopticDataConfig)
    text: RegionTextConfig = field(default_factory=RegionTextConfig)
    batch_size: int = 8
    num_workers: int = 2


@dataclass
class AlignConfig:
    """One region-alignment run. ``method`` picks the objective; everything else is shared."""

    output_dir: str = "runs/align"
    method: Literal["densevlm", "clipself", "declip"] = "densevlm"
    student: ModelSpec = field(default_factory=lambda: ModelSpec(name="EVA02-B-16"))
    # DenseVLM: the frozen P-VLM. CLIPSelf, DeCLIP: null for a frozen copy of the initial student.
    teacher: Optional[ModelSpec] = field(default_factory=lambda: ModelSpec(name="EVA02-L-14-336"))
    student_text: TextEmbeddingConfig = field(default_factory=TextEmbeddingConfig)
    teacher_text: TextEmbeddingConfig = field(default_factory=TextEmbeddingConfig)
    exclude_novel: bool = False  # train on the vocabulary's seen classes only (open-vocabulary protocol)
    densevlm: DenseVLMParams = field(default_factory=DenseVLMParams)
    declip: DeCLIPParams = field(default_factory=DeCLIPParams)
    unlocked_blocks: int = -1  # trailing vision blocks trained; -1 = all
    ensemble_alpha: Optional[float] = 0.9  # saved weights = alpha * student + (1 - alpha) * initial
    # DenseVLM: a teacher-target cache folder (`densevlm cache-teacher` writes it). Training then reads the teacher's
    # region features from it and never loads the teacher. Images missing from it are an error, or with
    # teacher_cache_missing=online the teacher runs for them (counted in the metrics as teacher_online_images);
    # =fill is the lazy mode: the folder may be empty, the teacher runs for images not cached yet and their
    # features are written to the cache, so the first epoch fills it and later epochs (and later runs) read it.
    teacher_cache: Optional[str] = None
    teacher_cache_missing: Literal["error", "online", "fill"] = "error"
    teacher_targets: TeacherTargetsConfig = field(default_factory=TeacherTargetsConfig)
    data: RegionDataConfig = field(default_factory=RegionDataConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.ensemble_alpha is not None and not 0.0 <= self.ensemble_alpha <= 1.0:
            raise ValueError(f"ensemble_alpha must be in [0, 1] or null, got {self.ensemble_alpha}")
        if self.method == "densevlm" and self.teacher is None:
            raise ValueError("method 'densevlm' needs a teacher (teacher.name and teacher.pretrained)")
        if self.method == "declip" and self.student.dense_last_block != self.declip.mode:
            raise ValueError(f"student.dense_last_block: method 'declip' tunes the decoupled last block, so it must "
                             f"be declip.mode {self.declip.mode!r} (the tuned model's dense path), got "
                             f"{self.student.dense_last_block!r}")
        if self.teacher_cache is not None and self.method != "densevlm":
            raise ValueError(f"teacher_cache: only method 'densevlm' reads a teacher cache, not {self.method!r}")
        if self.teacher_targets.corrections is not None and self.method != "densevlm":
            raise ValueError(f"teacher_targets.corrections: only method 'densevlm' trains on corrected teacher "
                             f"labels, not {self.method!r}")
        if self.teacher_targets.kind == "compact" and self.teacher_cache is None:
            raise ValueError("teacher_targets.kind=compact reads a compact target store: set teacher_cache to its "
                             "folder (`densevlm cache-teacher` builds it)")
        if self.teacher_targets.kind == "compact" and self.teacher_cache_missing != "error":
            raise ValueError(f"teacher_cache_missing={self.teacher_cache_missing!r}: a compact target store "
                             "(teacher_targets.kind=compact) must hold every image; build it with `densevlm "
                             "cache-teacher` (only the exact cache runs the teacher for missing images)")
