"""Config of the synthetic toy world (``densevlm toyworld``): size, scene statistics, the object-centric
close-ups of the pre-training mix, split, seed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

# The toy world's category names, in category-id order: plain data, so that a config naming a novel category
# is checked when it is loaded. ``densevlm/toyworld/categories.py`` defines each category under these names
# and refuses to import if the two lists differ.
THING_NAMES: tuple[str, ...] = ("boat", "car", "bicycle", "airplane", "person", "bird", "fish", "cow", "cat", "tree",
                                "flower", "mushroom", "house", "snowman", "umbrella", "kite", "balloon", "sun",
                                "clock", "chair")
STUFF_NAMES: tuple[str, ...] = ("sky", "water", "grass", "road", "snow", "sand", "brick wall", "wooden floor")

# Keys of the object-centric mix whose values must be fractions in [0, 1]; the share itself is checked apart.
_CLOSEUP_PROBS = ("stuff_closeup_share", "object_partial_prob", "object_plain_prob", "object_two_stuff_prob",
                  "object_mention_stuff_prob")


@dataclass
class ToyWorldConfig:
    """How many images of what kind the toy-world generator writes.

    Sizes are fractions of the image side; a thing's size is the side of the square its icon is drawn in.
    The same seed and config always give byte-identical files.

    ``num_train`` counts the train *scenes*. ``object_centric_share`` > 0 adds object-centric close-ups (one
    thing filling much of the frame, or one stuff filling it, with web alt-text captions) to the train split
    only, so many that they are that fraction of its images: ``num_closeups()`` of them. They have their own
    random stream and the image ids after every scene (train and val), so a world's scenes, its val split and
    every file of its scene-only (share 0) twin stay byte-identical whatever the share (see
    ``densevlm/toyworld/closeup.py``).
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
    # The object-centric part of the pre-training mix (issue 20); 0 = scenes only, the world of every release
    # before it. Its other keys matter only when the share is > 0.
    object_centric_share: float = 0.0  # close-ups / all train images; in [0, 1): num_train scenes stay
    stuff_closeup_share: float = 0.25  # of the close-ups: one stuff filling the frame (else one thing)
    min_object_size: float = 0.5  # a thing close-up's icon side / image side ...
    max_object_size: float = 1.1  # ... above 1 the icon overflows the frame: a partial view
    max_object_offset: float = 0.15  # the icon centre's offset from the image centre, per axis, / side
    object_partial_prob: float = 0.15  # a thing close-up is shifted so that part of it leaves the frame
    min_object_visible: float = 0.5  # of a thing's own pixels, the part that must stay inside the frame
    object_plain_prob: float = 0.2  # thing close-up on a plain, unlabelled background (panoptic void, 255)
    object_two_stuff_prob: float = 0.3  # ... on two stuff bands; otherwise on one stuff texture
    object_mention_stuff_prob: float = 0.3  # per caption: a thing close-up's background stuff is also named
    seed: int = 0
    workers: int = 2  # processes; 0 renders in-process

    def num_closeups(self) -> int:
        """How many object-centric close-ups the train split holds beside its ``num_train`` scenes: the number
        that makes them ``object_centric_share`` of the train images (rounded); none without scenes."""
        share = self.object_centric_share
        if share <= 0.0 or self.num_train == 0:
            return 0
        return int(round(self.num_train * share / (1.0 - share)))

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
        self._validate_closeups()
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {self.workers}")
        if self.novel_categories is not None:
            check_novel_names(self.novel_categories)

    def _validate_closeups(self) -> None:
        share = self.object_centric_share
        if not isinstance(share, (int, float)) or math.isnan(share) or not 0.0 <= share < 1.0:
            # 1 itself is out of reach too: num_train counts the scenes and the close-ups come on top of them.
            raise ValueError(f"object_centric_share must be in [0, 1) (the fraction of train images that are "
                             f"object-centric close-ups, added to the num_train scenes), got {share!r}")
        for key in _CLOSEUP_PROBS:
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value!r}")
        if self.object_plain_prob + self.object_two_stuff_prob > 1.0:
            raise ValueError(
                f"object_plain_prob + object_two_stuff_prob must be <= 1 (they split the thing close-ups' "
                f"backgrounds, the rest get one stuff), got {self.object_plain_prob} + {self.object_two_stuff_prob}")
        if not 0.0 < self.min_object_size <= self.max_object_size <= 2.0:
            raise ValueError(
                f"need 0 < min_object_size <= max_object_size <= 2, got min_object_size={self.min_object_size}, "
                f"max_object_size={self.max_object_size}")
        if not 0.0 <= self.max_object_offset <= 0.5:
            raise ValueError(f"max_object_offset must be in [0, 0.5] of the side, got {self.max_object_offset}")
        if not 0.0 < self.min_object_visible <= 1.0:
            raise ValueError(f"min_object_visible must be in (0, 1], got {self.min_object_visible}")


def check_novel_names(names: Sequence[str]) -> None:
    """Raise ValueError unless ``names`` are distinct known categories leaving at least one seen thing and stuff."""
    known = set(THING_NAMES) | set(STUFF_NAMES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"novel_categories: unknown categories {unknown}; known: {', '.join(THING_NAMES + STUFF_NAMES)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"novel_categories: duplicate names in {list(names)}")
    if set(THING_NAMES) <= set(names) or set(STUFF_NAMES) <= set(names):
        raise ValueError("novel_categories: at least one thing and one stuff category must stay seen (base)")
