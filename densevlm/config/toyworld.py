"""Config of the synthetic toy world (``densevlm toyworld``): size, scene statistics, split, seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ToyWorldConfig:
    """How many images of what kind the toy-world generator writes.

    Sizes are fractions of the image side; a thing's size is the side of the square its icon is drawn in.
    The same seed and config always give byte-identical files.
    """

    image_size: int = 192  # square images, pixels
    num_train: int = 4000
    num_val: int = 500
    min_things: int = 1  # things per image (before invisible ones are dropped)
    max_things: int = 4
    min_thing_size: float = 0.18  # icon side / image side
    max_thing_size: float = 0.45
    max_rotation: float = 30.0  # degrees; each category scales it (a house tilts less than a kite)
    min_stuff_regions: int = 1  # background regions per image, each a different stuff category
    max_stuff_regions: int = 3
    context_prob: float = 0.7  # probability that a thing stands on its preferred stuff
    captions_per_image: int = 5
    mention_largest_prob: float = 0.85  # per caption: the largest thing / stuff is named with this probability
    novel_fraction: float = 0.25  # of the things and (separately) of the stuff; drawn from the seed
    novel_categories: Optional[list[str]] = None  # explicit novel names; overrides novel_fraction
    min_segment_area: int = 16  # things with fewer visible pixels are removed from the scene
    jpeg_quality: int = 90
    seed: int = 0
    workers: int = 2  # processes; 0 renders in-process

    def validate(self) -> None:
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        if self.image_size > 4096:
            raise ValueError(f"image_size must be <= 4096, got {self.image_size}")
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError(f"num_train and num_val must be >= 0, got {self.num_train} and {self.num_val}")
        if self.num_train + self.num_val < 1:
            raise ValueError("num_train + num_val must be >= 1 (the world would be empty)")
        if not 1 <= self.min_things <= self.max_things <= 16:
            raise ValueError(
                f"need 1 <= min_things <= max_things <= 16, got min_things={self.min_things}, "
                f"max_things={self.max_things}"
            )
        if not 0.0 < self.min_thing_size <= self.max_thing_size <= 1.0:
            raise ValueError(
                f"need 0 < min_thing_size <= max_thing_size <= 1, got min_thing_size={self.min_thing_size}, "
                f"max_thing_size={self.max_thing_size}"
            )
        if not 0.0 <= self.max_rotation <= 180.0:
            raise ValueError(f"max_rotation must be in [0, 180] degrees, got {self.max_rotation}")
        if not 1 <= self.min_stuff_regions <= self.max_stuff_regions <= 4:
            raise ValueError(
                f"need 1 <= min_stuff_regions <= max_stuff_regions <= 4, got min_stuff_regions="
                f"{self.min_stuff_regions}, max_stuff_regions={self.max_stuff_regions}"
            )
        if not 0.0 <= self.context_prob <= 1.0:
            raise ValueError(f"context_prob must be in [0, 1], got {self.context_prob}")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        if not 0.0 <= self.mention_largest_prob <= 1.0:
            raise ValueError(f"mention_largest_prob must be in [0, 1], got {self.mention_largest_prob}")
        if not 0.0 <= self.novel_fraction < 1.0:
            raise ValueError(f"novel_fraction must be in [0, 1), got {self.novel_fraction}")
        if self.min_segment_area < 1:
            raise ValueError(f"min_segment_area must be >= 1 pixel, got {self.min_segment_area}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {self.workers}")
        if self.novel_categories is not None:
            # The category table is plain data; imported here so that a misspelt name fails at load time.
            from densevlm.toyworld.categories import check_novel_names

            check_novel_names(self.novel_categories)
