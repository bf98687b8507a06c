"""Config of region-classification evaluation (``densevlm.evaluation.regions``).

The defaults follow the reference protocol (DenseVLM/CLIPSelf ``COCOPanopticDataset`` + ``zero_shot.py``):
512-px resize-longest-and-pad input, up to 100 ground-truth segments per image, boxes with w·h < 8² or > 1024²
(in original pixels) dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from densevlm.config.core import ConfigError
from densevlm.config.model import ModelSpec
from densevlm.config.vocab import TextEmbeddingConfig


@dataclass
class PanopticDataConfig:
    """A COCO-panoptic-format split (COCO panoptic val2017, ADE20K panoptic val, a toy-world split).

    ``panoptic_json``: the annotations json (``images``, ``annotations`` with ``segments_info``, ``categories``).
    ``panoptic_root``: folder of the RGB-encoded segment PNGs; empty = the json path without ``.json``
    (``annotations/panoptic_val2017.json`` -> ``annotations/panoptic_val2017/``).
    ``image_root``: folder the ``images[*].file_name`` entries are relative to.
    ``image_size``: side of the square canvas (resize longest side, zero-pad right/bottom).
    ``min_box_size`` / ``max_box_size``: a segment whose box has w·h < min² or > max² original pixels is dropped
    (the reference's 8 and 1024; the upper bound only bites on large ADE20K images; null disables it).
    ``max_segments``: only the first this many segments of an image (json order) are considered, before the
    size filter, as in the reference.
    ``max_images``: evaluate the first N images only (null: all).
    ``mask_weights``: "area" gives each token the fraction of its cell the segment covers (area averaging);
    "binary" sets every token the segment touches to 1 (close to the reference's thresholded mask resize).
    """

    panoptic_json: str = ""
    panoptic_root: str = ""
    image_root: str = ""
    image_size: int = 512
    min_box_size: int = 8
    max_box_size: Optional[int] = 1024
    max_segments: int = 100
    max_images: Optional[int] = None
    mask_weights: Literal["area", "binary"] = "area"

    def validate(self) -> None:
        if self.image_size < 1:
            raise ConfigError(f"image_size: expected an integer >= 1, got {self.image_size}")
        if self.min_box_size < 0:
            raise ConfigError(f"min_box_size: expected an integer >= 0, got {self.min_box_size}")
        if self.max_box_size is not None and self.max_box_size < max(1, self.min_box_size):
            raise ConfigError(
                f"max_box_size: expected null or an integer >= min_box_size ({self.min_box_size}), "
                f"got {self.max_box_size}"
            )
        if self.max_segments < 1:
            raise ConfigError(f"max_segments: expected an integer >= 1, got {self.max_segments}")
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"max_images: expected null or an integer >= 1, got {self.max_images}")

    def resolved_panoptic_root(self) -> Path:
        """The PNG folder: ``panoptic_root`` or, when empty, the json path without its ``.json`` suffix."""
        if self.panoptic_root:
            return Path(self.panoptic_root)
        json_path = Path(self.panoptic_json)
        return json_path.with_suffix("") if json_path.suffix == ".json" else json_path.parent / json_path.stem

    def check_paths(self) -> None:
        """Raise ConfigError naming the key when a required path is unset (paths are often filled in late)."""
        for key in ("panoptic_json", "image_root"):
            if not getattr(self, key):
                raise ConfigError(f"data.{key}: required, got an empty string")


@dataclass
class RegionTextConfig(TextEmbeddingConfig):
    """:class:`TextEmbeddingConfig` whose ``vocabulary`` may be empty: the dataset's own categories.

    An empty default (rather than the parent's ``coco_ade_316``) matters: a YAML that sets only
    ``text.cache_dir`` must still classify against the dataset's classes, as the reference does.
    """

    vocabulary: str = ""

    def validate(self) -> None:
        # The parent rejects an empty vocabulary; validate everything else with a stand-in name.
        probe = self if self.vocabulary else dataclasses.replace(self, vocabulary="<dataset categories>")
        TextEmbeddingConfig.validate(probe)


@dataclass
class RegionEvalConfig:
    """``densevlm eval-regions``: classify ground-truth regions from pooled dense features.

    ``device``: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    ``temperature``: softmax temperature of the per-class probabilities behind the foreground-bias diagnostics
    (DenseVLM's teacher temperature, 0.01); accuracies do not depend on it.
    ``diagnostics``: also write the per-class table (markdown, CSV) and the foreground-bias figure.
    """

    output_dir: str = "runs/eval_regions"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: PanopticDataConfig = field(default_factory=PanopticDataConfig)
    text: RegionTextConfig = field(default_factory=RegionTextConfig)
    batch_size: int = 8
    num_workers: int = 2
    device: str = "auto"
    temperature: float = 0.01
    diagnostics: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: expected an integer >= 0, got {self.num_workers}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: expected a number > 0, got {self.temperature}")
        if not self.output_dir:
            raise ConfigError("output_dir: required, got an empty string")
