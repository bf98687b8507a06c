"""The toy world: a procedurally generated open-vocabulary dataset (things and stuff, captions, panoptic /
semantic / instance annotations in the standard COCO formats). It is the project's default data, test bed and
demo: a tiny CLIP is pre-trained on its captions, then region-language alignment is trained and evaluated on
its panoptic annotations.

    from densevlm.config.toyworld import ToyWorldConfig
    from densevlm.toyworld import generate_world, load_world
    world = generate_world(ToyWorldConfig(num_train=256, num_val=64), "data/toyworld")
"""

from densevlm.config.toyworld import ToyWorldConfig
from densevlm.toyworld.categories import categories
from densevlm.toyworld.generate import WORLD_VERSION, generate_world, load_world, split_paths

__all__ = ["ToyWorldConfig", "WORLD_VERSION", "categories", "generate_world", "load_world", "split_paths"]
