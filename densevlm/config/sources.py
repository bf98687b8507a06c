"""Config of the unlabelled image sources (``densevlm/data/sources.py`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ImageSourceConfig:
    """Where training images come from.

    kind: ``coco_json`` (``path`` = a COCO-format json whose ``images[*].file_name`` are relative to
    ``image_root``; boxes and categories are ignored), ``folder`` (every image below ``path``), ``hf_dataset``
    (``path`` = a ``datasets`` dataset saved on disk, or a hub name for users who are online; ``image_column``),
    ``toyworld`` (``path`` = a toy-world root; ``split``).
    """

    kind: Literal["coco_json", "folder", "hf_dataset", "toyworld"] = "coco_json"
    path: str = ""
    image_root: str = ""
    split: str = "train"
    image_column: str = "image"
    max_images: Optional[int] = None
    skip_bad_images: bool = False

    def validate(self) -> None:
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1 or null, got {self.max_images}")
