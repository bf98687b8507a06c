"""Config of training-free open-vocabulary semantic segmentation evaluation (``densevlm.evaluation.semseg``).

The defaults follow the protocol of the training-free line (MaskCLIP, TCL, FreeDA, Talk2DINO; mmseg's test
pipeline): resize so the short side is 448 (long side at most 2048), slide a 448×448 window with stride 224,
average the per-class logits where windows overlap, upsample bilinearly to the label's size, argmax, and score
with detectron2's ``SemSegEvaluator`` definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from densevlm.config.core import ConfigError
from densevlm.config.model import ModelSpec
from densevlm.config.talk2dino import Talk2DINOSegmenterConfig
from densevlm.config.vocab import TextEmbeddingConfig

IGNORE_LABEL = 255


@dataclass
class SemSegDataConfig:
    """A semantic-segmentation split in the detectron2 / mmseg layout: an image folder and a label-PNG folder.

    ``image_root`` / ``label_root``: the folders; an image ``<image_root>/<stem><image_suffix>`` has the label
    ``<label_root>/<stem><label_suffix>`` (``stem`` may contain sub-folders, as Cityscapes' city folders).
    ``split_file``: a text file of stems, one a line (mmseg's ``ImageSets/Segmentation/val.txt``); null = every
    image under ``image_root`` (searched recursively).
    ``num_classes``: the classes the label PNGs index (values 0..num_classes-1, ``ignore_label`` elsewhere); the
    vocabulary must have exactly this many. null = the vocabulary's size (no cross-check).
    ``reduce_zero_label``: mmseg's rule for PNGs whose 0 means "other": 0 becomes ``ignore_label`` and every
    other value v becomes v-1 (VOC-20 and Context-59 from the 21/60-class PNGs).
    ``on_bad_sample``: "error" stops at a missing label, an image/label size mismatch or a label value outside
    the classes; "skip" leaves such an image out with a warning and counts it in the results.
    ``max_images``: evaluate the first N images only (null: all).
    """

    image_root: str = ""
    label_root: str = ""
    image_suffix: str = ".jpg"
    label_suffix: str = ".png"
    split_file: Optional[str] = None
    num_classes: Optional[int] = None
    reduce_zero_label: bool = False
    ignore_label: int = IGNORE_LABEL
    on_bad_sample: Literal["error", "skip"] = "error"
    max_images: Optional[int] = None

    def validate(self) -> None:
        if self.num_classes is not None and not 1 <= self.num_classes <= 65535:
            raise ConfigError(f"num_classes: expected null or an integer in [1, 65535], got {self.num_classes}")
        if self.num_classes is not None and 0 <= self.ignore_label < self.num_classes:
            raise ConfigError(
                f"ignore_label: {self.ignore_label} is a class index (num_classes is {self.num_classes}); "
                "expected a value outside [0, num_classes)"
            )
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images: expected null or an integer >= 1, got {self.max_images}")
        for key in ("image_suffix", "label_suffix"):
            if not getattr(self, key):
                raise ConfigError(f"{key}: expected a file-name ending such as '.png', got an empty string")

    def check_paths(self) -> None:
        """Raise ConfigError naming the key when a required path is unset (recipes leave them to be filled)."""
        for key in ("image_root", "label_root"):
            if not getattr(self, key):
                raise ConfigError(f"data.{key}: required, got an empty string")


def toyworld_data(root: str | Path, split: str = "val", **overrides: object) -> SemSegDataConfig:
    """The semantic PNGs of a toy-world split (``annotations/semantic_<split>``, category index, 255 unlabeled)."""
    root = Path(root)
    cfg = SemSegDataConfig(image_root=str(root / "images" / split),
                           label_root=str(root / "annotations" / f"semantic_{split}"))
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ConfigError(f"toyworld_data: unknown data key {key!r}")
        setattr(cfg, key, value)
    cfg.validate()
    return cfg


@dataclass
class BackgroundConfig:
    """The background rule of datasets with a background class (VOC-21, Context-60; Talk2DINO's ``bg_thresh``).

    The class named ``name`` gets no text embedding: its score is the constant ``score`` everywhere, so a pixel
    is background when no other class scores above it. ``score`` lives in the segmenter's output space (dense
    CLIP: cosine similarity; Talk2DINO: sigmoid of the cosine, 0.55 for ViT-B).
    """

    enabled: bool = False
    name: str = "background"
    score: float = 0.0


@dataclass
class SemSegInferenceConfig:
    """How a segmenter is run over an image.

    ``short_side``: resize (keeping the aspect ratio, bilinear) so the short side is this, with the long side
    capped at ``max_long_side`` (mmseg's ``Resize(img_scale=(2048, 448), keep_ratio=True)``); null = as is.
    ``mode``: "slide" runs ``crop_size`` windows every ``stride`` pixels and averages the logits where they
    overlap (mmseg's slide inference; an image smaller than a window is one window); "whole" runs the image once.
    ``batch_size``: windows per forward pass (across images).
    Logits are upsampled bilinearly to the label's size before the argmax (scores are taken at label size).
    """

    short_side: Optional[int] = 448
    max_long_side: Optional[int] = 2048
    mode: Literal["slide", "whole"] = "slide"
    crop_size: int = 448
    stride: int = 224
    batch_size: int = 8
    background: BackgroundConfig = field(default_factory=BackgroundConfig)

    def validate(self) -> None:
        for key in ("short_side", "max_long_side"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: expected null or an integer >= 1, got {value}")
        if self.crop_size < 1:
            raise ConfigError(f"crop_size: expected an integer >= 1, got {self.crop_size}")
        if not 1 <= self.stride <= self.crop_size:
            raise ConfigError(
                f"stride: expected an integer in [1, crop_size={self.crop_size}] (windows must cover the image), "
                f"got {self.stride}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")


@dataclass
class SemSegEvalConfig:
    """``densevlm eval semseg``: per-pixel open-vocabulary segmentation, mIoU and friends.

    ``segmenter``: "dense_clip" classifies every patch of the model's dense map (value path, see
    ``model.dense_last_block``) against the class text embeddings; "talk2dino" scores a frozen backbone's patch
    tokens against ψ(class text) (``talk2dino`` section; ``model`` is then the CLIP text model, empty = the one
    recorded in the ψ run directory).
    ``text.vocabulary``: the dataset's classes in label order (label value i is class i).
    ``metrics_backend``: "auto" also runs detectron2's ``SemSegEvaluator`` when detectron2 is importable and
    reports its numbers (ours are kept and must agree); "densevlm" uses our confusion matrix only; "detectron2"
    requires detectron2.
    ``figures``: prediction overlays for this many images (0: none) plus the per-class IoU bars.
    ``device``: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"; under ``accelerate launch``
    every process takes its own device.
    """

    output_dir: str = "runs/eval_semseg"
    model: ModelSpec = field(default_factory=ModelSpec)
    segmenter: Literal["dense_clip", "talk2dino"] = "dense_clip"
    talk2dino: Talk2DINOSegmenterConfig = field(default_factory=Talk2DINOSegmenterConfig)
    data: SemSegDataConfig = field(default_factory=SemSegDataConfig)
    text: TextEmbeddingConfig = field(default_factory=lambda: TextEmbeddingConfig(vocabulary="ade20k_150"))
    inference: SemSegInferenceConfig = field(default_factory=SemSegInferenceConfig)
    num_workers: int = 2
    device: str = "auto"
    metrics_backend: Literal["auto", "densevlm", "detectron2"] = "auto"
    figures: int = 4

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: expected an integer >= 0, got {self.num_workers}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.figures < 0:
            raise ConfigError(f"figures: expected an integer >= 0, got {self.figures}")
        if not self.output_dir:
            raise ConfigError("output_dir: required, got an empty string")
