"""The ``open_clip`` layout: open_clip's own state dict (``CLIP`` / ``CustomTextCLIP``) plus its model config.

Reading: any state dict with open_clip key names (``DenseCLIP.save_weights``, open_clip's training code), and the
``dense_clip`` variant, a ``DenseCLIP`` module's own ``state_dict()`` (the same keys under ``clip.``, e.g. a
training checkpoint).

Writing ``--out NAME.pt`` (or ``.pth/.bin/.safetensors``) creates two files:

* ``NAME.pt``: every tensor of the model in open_clip names. ``open_clip.create_model(NAME, pretrained=NAME.pt)``
  loads it strictly, in open_clip 3.x and in the 2.16 that SAN pins (torch files hold tensors only, so torch's
  ``weights_only=True`` loading accepts them; 2.16 cannot read safetensors).
* ``NAME.json``: the model config, registered under the name ``NAME`` by ``open_clip.add_model_config(NAME.json)``.
  It is the architecture the weights were trained in, with ``quick_gelu`` when the model uses QuickGELU (open_clip
  2.16 has no ``-quickgelu`` ViT configs, so a QuickGELU model needs this file there). For ViTs it holds only keys
  that open_clip 2.16 knows; a model that needs newer keys gets a warning (SAN's 2.16 could not build it).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import nn

from densevlm.models.checkpoints import META_LAYOUT, write_tensors
from densevlm.models.layouts.base import Layout, StateDict, require_suffix, tensor_dict
from densevlm.utils.io import atomic_write_json

if TYPE_CHECKING:
    from densevlm.models.dense_clip import DenseCLIP

log = logging.getLogger(__name__)

#: model-config keys of open_clip 2.16.0 (``CLIP.__init__``, ``CLIPVisionCfg``, ``CLIPTextCfg``; ``custom_text`` is
#: read by its factory). SAN pins that version: a config with any other key fails there with a TypeError.
OPEN_CLIP_216_KEYS = {
    "top": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype", "output_dict", "custom_text"},
    "vision_cfg": {
        "layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value", "patch_dropout",
        "input_patchnorm", "global_average_pool", "attentional_pool", "n_queries", "attn_pooler_heads",
        "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
        "timm_drop_path", "output_tokens",
    },
    "text_cfg": {
        "context_length", "vocab_size", "width", "heads", "layers", "ls_init_value", "hf_model_name",
        "hf_tokenizer_name", "hf_model_pretrained", "proj", "pooler_type", "embed_cls", "pad_id", "output_tokens",
    },
}
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


# ----------------------------------------------------------------------------------------------- reading


def detect(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    return None  # open_clip names are the fallback: the strict key/shape check decides


def convert(sd: StateDict, model: nn.Module) -> StateDict:
    return dict(sd)


def detect_dense_clip(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    if all(k.startswith("clip.") for k in sd):
        return None
    return "keys do not all start with 'clip.'"


def convert_dense_clip(sd: StateDict, model: nn.Module) -> StateDict:
    return {k[len("clip."):]: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- writing


def portable_config(model: "DenseCLIP") -> dict[str, Any]:
    """The model config to ship beside the weights, with keys open_clip 2.16 does not know reported."""
    cfg = copy.deepcopy(model.model_cfg)
    unknown = sorted(k for k in cfg if k not in OPEN_CLIP_216_KEYS["top"])
    for tower in ("vision_cfg", "text_cfg"):
        unknown += sorted(f"{tower}.{k}" for k in cfg.get(tower, {}) if k not in OPEN_CLIP_216_KEYS[tower])
    if unknown:
        log.warning("%s: config keys %s are unknown to open_clip 2.16 (SAN's version); it builds there only after "
                    "removing them", model.name, unknown)
    return cfg


def incompatibility(model: "DenseCLIP") -> Optional[str]:
    return None  # every open_clip model has this layout


def config_path(out: Path) -> Path:
    return out.with_suffix(".json")


def outputs(out: Path) -> list[Path]:
    require_suffix(out, WEIGHT_SUFFIXES, "open_clip")
    return [out, config_path(out)]


def write(model: "DenseCLIP", out: Path) -> None:
    # no model name in the metadata: the config beside the weights names the architecture (as <stem>)
    metadata = {META_LAYOUT: "open_clip"} if out.suffix == ".safetensors" else None
    write_tensors(tensor_dict(model), out, metadata=metadata)
    atomic_write_json(config_path(out), portable_config(model))


LAYOUT = Layout(
    name="open_clip",
    description="open_clip state dict (CLIP / CustomTextCLIP) + model config JSON",
    detect=detect,
    convert=convert,
    incompatibility=incompatibility,
    outputs=outputs,
    write=write,
)

DENSE_CLIP_LAYOUT = Layout(
    name="dense_clip",
    description="a DenseCLIP module's own state_dict() (open_clip keys under 'clip.')",
    detect=detect_dense_clip,
    convert=convert_dense_clip,
)
