"""``ModelSpec``: which backbone to build and which weights to put in it (see ``densevlm.models.create_backbone``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

#: open_clip precision strings accepted by ``open_clip.create_model``.
Precision = Literal["fp32", "fp16", "bf16", "pure_fp16", "pure_bf16"]

#: top-level open_clip model-config keys a spec may override.
OVERRIDABLE_KEYS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias")


@dataclass
class ModelSpec:
    """A backbone: an open_clip architecture name plus the weights to load into it.

    Attributes:
        name: open_clip model name (``ViT-B-16``, ``ViT-L-14-336-quickgelu``, ``EVA02-B-16``,
            ``ToyCLIP-ViT-T-16``, ...). The CLIPSelf/DenseVLM reference names ``EVA02-CLIP-B-16`` and
            ``EVA02-CLIP-L-14-336`` are accepted and mapped to the open_clip names. May be empty when
            ``pretrained`` is a run directory whose ``config.yaml`` names the model.
        pretrained: None for random init; an open_clip pretrained tag (downloaded); a local weights file
            (``.safetensors``, ``.pt``, ``.pth``, ``.bin``: open_clip, OpenAI or CLIPSelf/DenseVLM reference
            layout); or a run directory holding ``weights.safetensors`` and ``config.yaml``.
        dense_last_block: "value" runs the last block without q·k attention in ``encode_dense`` (the
            reference dense path), "standard" runs it normally; "qq", "kk", "vv", "csa", "all" run DeCLIP's
            decoupled last block in that mode (the dense path of a DeCLIP-tuned model).
        precision: open_clip precision for the weights.
        force_quick_gelu: build the towers with QuickGELU (OpenAI-trained weights need it).
        cache_dir: download cache for pretrained tags.
        model_overrides: deep-merged into the open_clip model config before building, e.g.
            ``{"vision_cfg": {"layers": 2, "width": 64}}`` for a small test model. Checkpoints must then
            match the overridden architecture.
    """

    name: str = ""
    pretrained: Optional[str] = None
    dense_last_block: Literal["value", "standard", "qq", "kk", "vv", "csa", "all"] = "value"
    precision: Precision = "fp32"
    force_quick_gelu: bool = False
    cache_dir: Optional[str] = None
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name and not self.pretrained:
            raise ValueError("name: an open_clip model name is required (or a run directory as 'pretrained')")
        for key, value in self.model_overrides.items():
            if key not in OVERRIDABLE_KEYS:
                raise ValueError(f"model_overrides.{key}: unknown model-config key, expected one of {list(OVERRIDABLE_KEYS)}")
            if key in ("vision_cfg", "text_cfg") and not isinstance(value, dict):
                raise ValueError(f"model_overrides.{key}: expected a mapping, got {value!r}")
