"""Training-free dense predictors with one interface (images -> per-class logits), their registry and the
inference protocol."""

from densevlm.segmenters.base import Segmenter
from densevlm.segmenters.dense_clip import DenseCLIPSegmenter
from densevlm.segmenters.inference import add_background, predict, slide_windows
from densevlm.segmenters.registry import SEGMENTERS, get_segmenter, register_segmenter
from densevlm.segmenters.talk2dino import Talk2DINOSegmenter

__all__ = ["SEGMENTERS", "DenseCLIPSegmenter", "Segmenter", "Talk2DINOSegmenter", "add_background",
           "get_segmenter", "predict", "register_segmenter", "slide_windows"]
