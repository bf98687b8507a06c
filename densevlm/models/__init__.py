"""Backbones: build open_clip ViT / EVA02 models from a spec and get global, text and dense features.

Importing this package registers the configs in ``model_configs/`` with open_clip (so
``open_clip.create_model("ToyCLIP-ViT-T-16", pretrained=<file>)`` works) and the timm trunk they use.
"""

from densevlm.config.model import ModelSpec
from densevlm.models.checkpoints import CheckpointLayoutError, read_checkpoint, save_weights
from densevlm.models.dense_clip import DenseCLIP
from densevlm.models.eva import EvaDense
from densevlm.models.layouts import LAYOUTS, ExportError, convert_to_model_layout, export_model, writable_layouts
from densevlm.models.factory import (
    REFERENCE_NAME_ALIASES,
    create_backbone,
    register_model_configs,
    resolve_model_name,
    run_dir_spec,
)
from densevlm.models.openclip_vit import OpenCLIPViTDense
from densevlm.models.pooling import masks_to_token_grid, pool_boxes, pool_masks
from densevlm.models.tuning import freeze_for_dense_tuning, param_groups_for_adamw, split_weight_decay

register_model_configs()

__all__ = [
    "CheckpointLayoutError",
    "DenseCLIP",
    "EvaDense",
    "ExportError",
    "LAYOUTS",
    "ModelSpec",
    "OpenCLIPViTDense",
    "REFERENCE_NAME_ALIASES",
    "convert_to_model_layout",
    "create_backbone",
    "export_model",
    "freeze_for_dense_tuning",
    "masks_to_token_grid",
    "param_groups_for_adamw",
    "pool_boxes",
    "pool_masks",
    "read_checkpoint",
    "register_model_configs",
    "resolve_model_name",
    "run_dir_spec",
    "save_weights",
    "split_weight_decay",
    "writable_layouts",
]
