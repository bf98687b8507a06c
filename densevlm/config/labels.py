"""Config of ``densevlm labels propose``: the teacher's labels for every region of a data source, for review."""

from __future__ import annotations

from dataclasses import dataclass, field

from densevlm.config.align import DenseVLMParams, RegionDataConfig
from densevlm.config.core import ConfigError
from densevlm.config.model import ModelSpec
from densevlm.config.sources import ImageSourceConfig
from densevlm.config.vocab import TextEmbeddingConfig

#: The toy world ``densevlm toyworld --out data/toyworld`` writes, where DenseVLM's toy recipes look for it.
TOY_WORLD = "data/toyworld"


@dataclass
class LabelsProposeConfig:
    """The teacher (as a DenseVLM recipe names it: the default is the zoo's CLIPSelf-tuned teacher, whose text
    tower is ``toy-teacher``'s), its vocabulary, the images and their regions, and what the review files show.

    The defaults label 100 training images of the toy world at ``data/toyworld`` on its grid cells;
    ``data.regions`` takes boxes or masks from a COCO file instead (``--set data.regions.kind=masks
    data.regions.path=...``).
    """

    output_dir: str = "runs/labels"
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec(name="toy-teacher-clipself"))
    teacher_text: TextEmbeddingConfig = field(
        default_factory=lambda: TextEmbeddingConfig(vocabulary=TOY_WORLD, templates="short"))
    exclude_novel: bool = True  # as DenseVLM trains: the vocabulary's seen classes only
    densevlm: DenseVLMParams = field(default_factory=DenseVLMParams)  # temperature and the confidence threshold
    data: RegionDataConfig = field(default_factory=lambda: RegionDataConfig(
        source=ImageSourceConfig(kind="toyworld", path=TOY_WORLD, split="train", max_images=100), image_size=192))
    top_k: int = 5  # categories listed per region
    batch_size: int = 8
    device: str = "auto"
    sheet_images: int = 200  # images on the contact sheet (its first ones)
    thumb_size: int = 192  # longest side of a contact-sheet thumbnail, pixels

    def validate(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"top_k: expected an integer >= 1, got {self.top_k}")
        if self.batch_size < 1 or self.thumb_size < 16 or self.sheet_images < 0:
            raise ConfigError("batch_size must be >= 1, thumb_size >= 16, sheet_images >= 0")
