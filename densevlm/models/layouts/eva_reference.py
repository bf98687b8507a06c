"""The ``eva_reference`` layout: CLIPSelf / DenseVLM reference EVA-CLIP checkpoints, for EVA02 models.

The reference code (a fork of open_clip 2.16 with an ``eva_clip`` package) saves ``{"epoch", "name",
"state_dict"}`` with ``visual.*`` (its EVA ViT, RoPE tables included), ``text.*`` and ``logit_scale``; F-ViT's
``EvaCLIPViT`` loads the ``visual`` part of such a file with ``strict=True``.

Reading converts into open_clip's EVA02 layout (timm ``Eva`` trunk under ``visual.trunk.``) with timm's
``checkpoint_filter_fn`` (key renames ``mlp.w1/w2/w3/ffn_ln``, ``attn.inner_attn_ln``, ``q_bias/v_bias``). The RoPE
tables are not loaded (the model recomputes them) but checked against the model's RoPE settings, so a checkpoint
trained with other settings fails loudly instead of silently changing numerics. Writing is the inverse renaming,
with the RoPE tables computed by the reference formula, so reading a reference file and writing it back gives the
same tensors bit for bit.

The architecture need not be registered in advance: :func:`register_reference_config` builds it from a reference
``eva_clip`` model-config JSON, :func:`infer_reference_config` from the shapes of a checkpoint.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from open_clip.model import CustomTextCLIP
from open_clip.timm_model import TimmModel
from timm.layers import SwiGLU
from timm.models.eva import Eva, EvaBlock, checkpoint_filter_fn
from torch import nn

from densevlm.config.core import ConfigError
from densevlm.models.checkpoints import write_tensors
from densevlm.models.layouts.base import Layout, StateDict, require_suffix, tensor_dict
from densevlm.models.eva import eva02_trunk_name, register_eva02_trunk
from densevlm.models.named_configs import register_config
from densevlm.models.positional import reference_rope_sincos

if TYPE_CHECKING:
    from densevlm.models.dense_clip import DenseCLIP

log = logging.getLogger(__name__)

# timm EVA02 block names -> reference names (the inverse of timm's checkpoint_filter_fn for q/k/v-split trunks)
_TO_REFERENCE = (
    (".attn.q_proj.bias", ".attn.q_bias"),
    (".attn.v_proj.bias", ".attn.v_bias"),
    (".attn.norm.", ".attn.inner_attn_ln."),
    (".mlp.fc1_g.", ".mlp.w1."),
    (".mlp.fc1_x.", ".mlp.w2."),
    (".mlp.norm.", ".mlp.ffn_ln."),
    (".mlp.fc2.", ".mlp.w3."),
)


# ----------------------------------------------------------------------------------------------- reading


def detect(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    if "visual.pos_embed" in sd and any(k.startswith("visual.blocks.") for k in sd):
        return None
    return "no 'visual.pos_embed' / 'visual.blocks.*' keys"


def _trunk_of(model: nn.Module) -> Eva:
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not isinstance(trunk, Eva):
        raise ValueError(
            f"the checkpoint holds an EVA ViT but the model's vision tower is "
            f"{type(getattr(model, 'visual', None)).__name__}, not a timm Eva trunk (use an EVA02 model name)"
        )
    return trunk


def convert(sd: StateDict, model: nn.Module) -> StateDict:
    trunk = _trunk_of(model)
    # Refuse the size mismatches timm's filter would silently resample: a strict load means the checkpoint
    # fits the architecture as it is.
    for key, target in (("visual.pos_embed", trunk.pos_embed), ("visual.patch_embed.proj.weight", trunk.patch_embed.proj.weight)):
        if key in sd and target is not None and tuple(sd[key].shape) != tuple(target.shape):
            raise ValueError(f"'{key}' has shape {tuple(sd[key].shape)}, the model expects {tuple(target.shape)}")
    check_rope_tables(sd, trunk)
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    out = {f"visual.trunk.{k}": v for k, v in checkpoint_filter_fn(visual, trunk).items()}
    for key, value in sd.items():
        if not key.startswith("visual."):
            out[key] = value  # text.* and logit_scale already use open_clip's CustomTextCLIP names
    return out


def _rope_tables(trunk: Eva) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(sin, cos) tables the reference stores for the trunk's native grid, or None without RoPE."""
    rope = trunk.rope
    if rope is None:
        return None
    ref = tuple(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
    return reference_rope_sincos(tuple(trunk.patch_embed.grid_size), rope.dim, ref, float(rope.temperature))


def check_rope_tables(sd: Mapping[str, torch.Tensor], trunk: Eva) -> None:
    """The reference stores its RoPE tables; they must equal what the model will compute at its native grid."""
    cos_keys = sorted(k for k in sd if k.startswith("visual.") and k.endswith("rope.freqs_cos"))
    if not cos_keys:
        return
    tables = _rope_tables(trunk)
    if tables is None:
        raise ValueError(f"the checkpoint has RoPE buffers ('{cos_keys[0]}') but the model has no rotary embedding")
    sin, cos = tables
    ref = trunk.rope.ref_feat_shape
    for cos_key in cos_keys:
        sin_key = cos_key[: -len("cos")] + "sin"
        for key, expected in ((cos_key, cos), (sin_key, sin)):
            stored = sd.get(key)
            if stored is None:
                continue
            if tuple(stored.shape) != tuple(expected.shape) or not torch.allclose(stored.float(), expected, atol=1e-5):
                raise ValueError(
                    f"'{key}' (shape {tuple(stored.shape)}) does not match the model's RoPE table for a "
                    f"{tuple(trunk.patch_embed.grid_size)} grid with pre-training grid {ref} (shape "
                    f"{tuple(expected.shape)}): the checkpoint was trained with other RoPE settings"
                )


# ----------------------------------------------------------------------------------------------- writing


def incompatibility(model: "DenseCLIP") -> Optional[str]:
    clip = model.clip
    trunk = getattr(getattr(clip, "visual", None), "trunk", None)
    if not isinstance(clip, CustomTextCLIP) or not isinstance(clip.visual, TimmModel) or not isinstance(trunk, Eva):
        return (f"the reference EVA-CLIP layout holds an EVA02 vision tower (timm Eva trunk) beside a 'text' tower; "
                f"this model is a {type(clip).__name__} with a {type(getattr(clip, 'visual', None)).__name__} vision "
                "tower")
    if any(True for _ in clip.visual.head.parameters()):
        return "the vision tower has a projection outside the trunk; the reference projects with the trunk's head"
    problems = []
    for i, block in enumerate(trunk.blocks):
        if type(block) is not EvaBlock or block.attn.qkv is not None:
            problems.append(f"block {i} must be a pre-norm EvaBlock with separate q/k/v projections")
            break
        if not isinstance(block.mlp, SwiGLU) or not hasattr(block.mlp, "fc1_g"):
            problems.append(f"block {i} must use EVA02's SwiGLU MLP (w1/w2/w3)")
            break
    if trunk.reg_token is not None or trunk.cls_token is None:
        problems.append("the trunk must have one class token and no register tokens")
    return "; ".join(problems) if problems else None


def to_reference_state_dict(model: "DenseCLIP") -> StateDict:
    """The model's tensors in reference names and order: logit_scale, visual.* (RoPE tables included), text.*."""
    sd = tensor_dict(model)
    trunk = model.clip.visual.trunk
    out: StateDict = {}
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    tables = _rope_tables(trunk)
    for key, value in sd.items():
        if not key.startswith("visual.trunk."):
            continue
        name = "visual." + key[len("visual.trunk."):]
        for old, new in _TO_REFERENCE:
            name = name.replace(old, new)
        out[name] = value
        if name == "visual.patch_embed.proj.bias" and tables is not None:
            out["visual.rope.freqs_cos"], out["visual.rope.freqs_sin"] = tables[1], tables[0]
        if name.endswith(".attn.proj.bias") and tables is not None:  # the reference's block order: rope after proj
            prefix = name[: -len("proj.bias")]
            out[prefix + "rope.freqs_cos"], out[prefix + "rope.freqs_sin"] = tables[1], tables[0]
    for key, value in sd.items():
        if not key.startswith("visual.") and key != "logit_scale":
            out[key] = value
    return {key: out[key] for key in _reference_order(list(out))}


#: parameter order inside a reference ``Block`` (its attribute order), so a written file lists keys as the reference
_BLOCK_ORDER = ("norm1.", "attn.q_bias", "attn.v_bias", "attn.q_proj.", "attn.k_proj.", "attn.v_proj.",
                "attn.inner_attn_ln.", "attn.proj.", "attn.rope.", "norm2.", "mlp.w1.", "mlp.w2.", "mlp.ffn_ln.",
                "mlp.w3.")


def _reference_order(keys: list[str]) -> list[str]:
    """``keys`` with each block's keys in the reference's attribute order; blocks and other keys keep their place."""
    first: dict[str, int] = {}
    ranks = []
    for position, key in enumerate(keys):
        if key.startswith("visual.blocks."):
            block, rest = key[len("visual.blocks."):].split(".", 1)
            anchor = first.setdefault(block, position)
            rank = next((i for i, prefix in enumerate(_BLOCK_ORDER) if rest.startswith(prefix)), len(_BLOCK_ORDER))
            ranks.append((anchor, rank, position))
        else:
            ranks.append((position, 0, position))
    return [key for _, key in sorted(zip(ranks, keys))]


def outputs(out: Path) -> list[Path]:
    require_suffix(out, (".pt", ".pth"), "eva_reference")
    return [out]


def write(model: "DenseCLIP", out: Path) -> None:
    extras = model.load_info.get("extras") or {}
    wrapper = {"epoch": int(extras.get("epoch", 0)), "name": str(extras.get("name", model.name))}
    write_tensors(to_reference_state_dict(model), out, wrapper=wrapper)


LAYOUT = Layout(
    name="eva_reference",
    description="CLIPSelf/DenseVLM reference EVA-CLIP ({epoch, name, state_dict}: visual.blocks.*, text.*, logit_scale)",
    detect=detect,
    convert=convert,
    incompatibility=incompatibility,
    outputs=outputs,
    write=write,
)


# ----------------------------------------------------------------------------------------------- architectures

#: reference vision_cfg keys understood here (xattn/fusedLN/drop rates only select kernels or training behaviour)
_VISION_KEYS = {"eva_model_name", "drop_path_rate", "xattn", "fusedLN", "patch_dropout", "intp_freq",
                        "layers", "width", "head_width", "patch_size", "image_size", "mlp_ratio", "rope",
                        "pt_hw_seq_len", "naiveswiglu", "subln", "qkv_bias", "ls_init_value", "postnorm",
                        "swiglu", "use_rms_norm", "grad_checkpointing", "qk_norm"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "ls_init_value", "xattn", "fusedLN",
              "mlp_ratio"}


def is_reference_config(cfg: Any) -> bool:
    """True for an ``eva_clip`` model config (EVA vision keys, no timm model name)."""
    vision = cfg.get("vision_cfg", {}) if isinstance(cfg, dict) else {}
    return isinstance(vision, dict) and "timm_model_name" not in vision and (
        "eva_model_name" in vision or "rope" in vision or "naiveswiglu" in vision or "subln" in vision)


def _trunk_name(vision: dict[str, Any], source: str) -> str:
    """The timm trunk name (see :func:`densevlm.models.eva.eva02_trunk_name`) of a reference vision_cfg."""
    unknown = sorted(set(vision) - _VISION_KEYS)
    if unknown:
        raise ConfigError(f"{source}: vision_cfg keys {unknown} are not understood (known: {sorted(_VISION_KEYS)})")
    unsupported = [k for k in ("postnorm", "swiglu", "use_rms_norm", "qk_norm") if vision.get(k)]
    if vision.get("rope") and vision.get("intp_freq") is False:
        unsupported.append("intp_freq=false")
    if not vision.get("naiveswiglu"):
        unsupported.append("naiveswiglu=false (EVA02's SwiGLU MLP is required)")
    if unsupported:
        raise ConfigError(f"{source}: vision_cfg {unsupported} not supported (only the EVA02-CLIP block recipe is)")
    try:
        width, layers = int(vision["width"]), int(vision["layers"])
        patch, image = int(vision["patch_size"]), int(vision["image_size"])
    except KeyError as err:
        raise ConfigError(f"{source}: vision_cfg needs '{err.args[0]}'") from None
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise ConfigError(f"{source}: vision_cfg width {width} is not a multiple of head_width {head_width}")
    name = eva02_trunk_name(
        width=width, depth=layers, heads=width // head_width, patch=patch, image=image,
        mlp_hidden=int(width * float(vision.get("mlp_ratio", 4.0))),  # the reference's own rounding
        rope_pretrain_grid=int(vision.get("pt_hw_seq_len", 16)) if vision.get("rope") else 0,
        subln=bool(vision.get("subln", False)), qkv_bias=bool(vision.get("qkv_bias", True)),
        layer_scale=vision.get("ls_init_value") is not None,
    )
    register_eva02_trunk(name)
    return name


def register_reference_config(cfg: dict[str, Any], name: str, *, source: str = "reference config") -> str:
    """Register the architecture of a reference ``eva_clip`` model config with timm and open_clip; return its name."""
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise ConfigError(f"{source}: expected an eva_clip model config with embed_dim, vision_cfg and text_cfg")
    vision = dict(cfg["vision_cfg"])
    text = dict(cfg["text_cfg"])
    unknown = sorted(set(text) - _TEXT_KEYS)
    if unknown:
        raise ConfigError(f"{source}: text_cfg keys {unknown} are not understood (known: {sorted(_TEXT_KEYS)})")
    trunk = _trunk_name(vision, source)
    text_cfg = {k: text[k] for k in ("context_length", "vocab_size", "width", "heads", "layers", "ls_init_value",
                                     "mlp_ratio") if k in text}
    open_clip_cfg = {
        "embed_dim": int(cfg["embed_dim"]),
        "vision_cfg": {"image_size": int(vision["image_size"]), "timm_model_name": trunk,
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None},
        "text_cfg": text_cfg,
        "custom_text": True,
    }
    return register_config(open_clip_cfg, name, source=source)


def _pretrain_grid(table: torch.Tensor, grid: tuple[int, int], head_dim: int) -> Optional[int]:
    """The reference's ``pt_hw_seq_len`` that produced a stored cos table, searched over plausible values."""
    for pt in [16] + [n for n in range(1, 129) if n != 16]:
        _, cos = reference_rope_sincos(grid, head_dim, (pt, pt))
        if cos.shape == table.shape and torch.allclose(cos, table.float(), atol=1e-5):
            return pt
    return None


def infer_reference_config(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict[str, Any], list[str]]:
    """An ``eva_clip`` model config from the shapes (and RoPE tables) of a reference state dict.

    Returns (config, assumptions): what the shapes cannot tell is filled by the EVA-CLIP conventions and listed.
    Raises ConfigError naming the keys that disagree with any EVA02-CLIP architecture.
    """
    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise ConfigError(f"{source}: '{key}' is missing, so the architecture cannot be read from the shapes; "
                              "pass the reference model-config JSON as the model name")
        return sd[key]

    pos = need("visual.pos_embed")
    patch_w = need("visual.patch_embed.proj.weight")
    width, tokens = int(pos.shape[-1]), int(pos.shape[-2])
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise ConfigError(f"{source}: 'visual.pos_embed' {tuple(pos.shape)} is not 1 class token + a square grid")
    if patch_w.shape[0] != width or patch_w.shape[-1] != patch_w.shape[-2]:
        raise ConfigError(f"{source}: 'visual.patch_embed.proj.weight' {tuple(patch_w.shape)} disagrees with "
                          f"'visual.pos_embed' width {width} (or has non-square patches)")
    patch = int(patch_w.shape[-1])
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("visual.blocks."))
    w1 = need("visual.blocks.0.mlp.w1.weight")
    for key in ("visual.blocks.0.mlp.w2.weight", "visual.blocks.0.mlp.w3.weight"):
        need(key)
    hidden = int(w1.shape[0])
    assumptions: list[str] = []
    vision: dict[str, Any] = {
        "image_size": grid * patch, "layers": layers, "width": width, "patch_size": patch,
        # the reference and timm both build int(width * mlp_ratio) hidden units: aim at the middle of that integer
        "mlp_ratio": (hidden + 0.5) / width, "naiveswiglu": True,
        "subln": "visual.blocks.0.attn.inner_attn_ln.weight" in sd,
        "qkv_bias": "visual.blocks.0.attn.q_bias" in sd,
    }
    if "visual.blocks.0.gamma_1" in sd:
        vision["ls_init_value"] = 1.0  # layer scale exists; its init value is irrelevant once weights are loaded
    cos = sd.get("visual.rope.freqs_cos")
    if cos is not None:
        head_dim = int(cos.shape[-1])
        pt = _pretrain_grid(cos, (grid, grid), head_dim)
        if pt is None:
            raise ConfigError(f"{source}: 'visual.rope.freqs_cos' {tuple(cos.shape)} matches no EVA02 RoPE table "
                              f"for a {grid}x{grid} grid and head width {head_dim}")
        vision.update(rope=True, head_width=head_dim, pt_hw_seq_len=pt, intp_freq=True)
    else:
        vision.update(rope=False, head_width=64)
        assumptions.append("no RoPE tables: vision head width 64 (the EVA-CLIP convention), no rotary embedding")
    if width % vision["head_width"]:
        raise ConfigError(f"{source}: vision width {width} is not a multiple of the head width {vision['head_width']}")
    embed_dim = int(need("visual.head.weight").shape[0])
    text_width = int(need("text.ln_final.weight").shape[0])
    text_layers = 1 + max((int(k.split(".")[3]) for k in sd if k.startswith("text.transformer.resblocks.")), default=-1)
    if text_layers <= 0:
        raise ConfigError(f"{source}: no 'text.transformer.resblocks.*' keys; the text tower is required")
    if text_width % 64:
        raise ConfigError(f"{source}: text width {text_width} is not a multiple of 64, so its head count cannot be "
                          "assumed; pass the reference model-config JSON as the model name")
    assumptions.append(f"text heads {text_width // 64} (width/64, the CLIP convention: the checkpoint does not store it)")
    text: dict[str, Any] = {
        "context_length": int(need("text.positional_embedding").shape[0]),
        "vocab_size": int(need("text.token_embedding.weight").shape[0]),
        "width": text_width, "heads": text_width // 64, "layers": text_layers,
    }
    c_fc = sd.get("text.transformer.resblocks.0.mlp.c_fc.weight")
    if c_fc is not None and int(c_fc.shape[0]) != 4 * text_width:
        text["mlp_ratio"] = int(c_fc.shape[0]) / text_width
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}, assumptions


def register_from_checkpoint(sd: Mapping[str, torch.Tensor], source: str) -> str:
    """Register the architecture of a reference state dict (from its shapes); return the open_clip name."""
    cfg, assumptions = infer_reference_config(sd, source)
    for note in assumptions:
        log.warning("%s: architecture read from the shapes; assumed %s", source, note)
    v = cfg["vision_cfg"]
    return register_reference_config(cfg, f"EVA02-CLIP-w{v['width']}-d{v['layers']}-p{v['patch_size']}-"
                                          f"{v['image_size']}", source=source)


def register_reference_config_file(path: Path, cfg: dict[str, Any]) -> str:
    return register_reference_config(cfg, path.stem, source=str(path))
