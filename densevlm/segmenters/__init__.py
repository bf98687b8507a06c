"""Training-free dense predictors with one interface (images -> per-class logits) and the inference protocol."""

from densevlm.segmenters.base import Segmenter
from densevlm.segmenters.dense_clip import DenseCLIPSegmenter
from densevlm.segmenters.inference import add_background, predict, slide_windows
from densevlm.segmenters.talk2dino import Talk2DINOSegmenter

__all__ = ["DenseCLIPSegmenter", "Segmenter", "Talk2DINOSegmenter", "add_background", "predict", "slide_windows"]
