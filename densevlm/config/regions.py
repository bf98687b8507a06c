"""Config of where training and labelling regions come from (``densevlm/data/region_sources/`` reads it), and of
the reviewed teacher labels DenseVLM can train with (``teacher_targets.corrections``)."""

from __future__ import annotations

from dataclasses import dataclass

from densevlm.config.core import ConfigError


@dataclass
class RegionSourceConfig:
    """The regions of each image: a registry name (``kind``) and its file.

    kind: ``grid`` (random grid cells, the reference's; labelling uses the ``max_split`` x ``max_split`` cells),
    ``boxes`` (``path`` = a COCO json: ground truth or proposals with ``score``; a COCO results list works when the
    image source's json carries image ids; CLIPSelf's proposal mode), ``masks`` (``path`` = a COCO json whose
    annotations carry RLE or polygon ``segmentation`` (SAM's automatic masks saved as RLE json included), or a
    COCO-panoptic json whose PNGs are in ``panoptic_root``; regions are pooled by mask).
    top_k: per image, the ``top_k`` highest-scoring regions (0 = all); min_score: drop regions scoring below.
    Regions without a score count as 1.
    """

    kind: str = "grid"
    path: str = ""
    panoptic_root: str = ""  # masks from a panoptic json: its PNG folder ('' = the json path without .json)
    top_k: int = 0
    min_score: float = 0.0

    def validate(self) -> None:
        if self.top_k < 0:
            raise ConfigError(f"regions.top_k: expected an integer >= 0 (0 = all), got {self.top_k}")
        if self.kind != "grid" and not self.path:
            raise ConfigError(f"regions.path: a '{self.kind}' region source needs its COCO json file")
