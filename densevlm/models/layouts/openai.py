"""The ``openai`` layout: OpenAI CLIP's state dict, for ViT models (what CAT-Seg's vendored CLIP loads).

Key names are open_clip's ``CLIP`` names (identical to OpenAI's), plus the three entries OpenAI's TorchScript files
carry and its ``build_model(state_dict)`` deletes before loading: ``input_resolution``, ``context_length`` and
``vocab_size``, written as 0-d int64 tensors (read back as tensors or plain ints).

``build_model`` infers the architecture from shapes and hard-codes the rest, so a model can be written here only if
it is that architecture: an open_clip ``CLIP`` (text tower at the top level) with a ``VisionTransformer``, QuickGELU
everywhere, 64-wide attention heads in both towers, MLP ratio 4, standard blocks (no layer scale, no sub-LN), a
class-token pooled and projected vision tower, and an argmax-pooled text tower with a plain projection matrix.
Anything else would load (CAT-Seg's loader is ``strict=False``) and compute something else.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn

from densevlm.models.checkpoints import write_tensors
from densevlm.models.layouts.base import Layout, StateDict, require_suffix, tensor_dict

if TYPE_CHECKING:
    from densevlm.models.dense_clip import DenseCLIP

EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
HEAD_WIDTH = 64  # build_model: heads = width // 64 in both towers


# ----------------------------------------------------------------------------------------------- reading


def detect(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    if all(k in sd for k in EXTRA_KEYS):
        return None
    return f"no {'/'.join(EXTRA_KEYS)} entries"


def convert(sd: StateDict, model: nn.Module) -> StateDict:
    return {k: v for k, v in sd.items() if k not in EXTRA_KEYS}


# ----------------------------------------------------------------------------------------------- writing


def _tower_problems(blocks: list[nn.Module], tower: str) -> list[str]:
    problems = []
    for i, block in enumerate(blocks):
        if type(block) is not ResidualAttentionBlock:
            problems.append(f"{tower} block {i} is a {type(block).__name__}, not a standard ResidualAttentionBlock")
            break
        attn = block.attn
        width = attn.embed_dim
        if attn.num_heads != width // HEAD_WIDTH:
            problems.append(f"{tower} attention has {attn.num_heads} heads of width {width // attn.num_heads}; "
                            f"OpenAI CLIP builds width/{HEAD_WIDTH} = {width // HEAD_WIDTH}")
            break
        if not isinstance(block.mlp.gelu, QuickGELU):
            problems.append(f"{tower} MLP uses {type(block.mlp.gelu).__name__}; OpenAI CLIP uses QuickGELU "
                            "(use a '-quickgelu' model, or model.force_quick_gelu)")
            break
        if block.mlp.c_fc.out_features != 4 * width:
            problems.append(f"{tower} MLP ratio is {block.mlp.c_fc.out_features / width:g}, OpenAI CLIP uses 4")
            break
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            problems.append(f"{tower} blocks use layer scale, which OpenAI CLIP does not have")
            break
    return problems


def incompatibility(model: "DenseCLIP") -> Optional[str]:
    clip = model.clip
    if type(clip) is not CLIP or not isinstance(getattr(clip, "visual", None), VisionTransformer):
        return (f"OpenAI CLIP is a ViT with its text tower at the top level; this model is a "
                f"{type(clip).__name__} with a {type(getattr(clip, 'visual', None)).__name__} vision tower")
    visual = clip.visual
    problems = []
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        problems.append("the vision tower must pool its class token after ln_post")
    if visual.proj is None or isinstance(visual.ln_pre, nn.Identity) or visual.conv1.bias is not None:
        problems.append("the vision tower needs ln_pre, a bias-free patch convolution and a projection matrix")
    if getattr(clip, "text_pool_type", "argmax") != "argmax" or not isinstance(clip.text_projection, nn.Parameter):
        problems.append("the text tower must pool at the end-of-text token and project with a plain matrix")
    problems += _tower_problems(list(visual.transformer.resblocks), "vision")
    problems += _tower_problems(list(clip.transformer.resblocks), "text")
    return "; ".join(problems) if problems else None


def outputs(out: Path) -> list[Path]:
    require_suffix(out, (".pt", ".pth", ".bin"), "openai")
    return [out]


def to_openai_state_dict(model: "DenseCLIP") -> StateDict:
    """Every tensor of the model under OpenAI's names, plus the three 0-d entries ``build_model`` deletes."""
    sd = tensor_dict(model)
    sd["input_resolution"] = torch.tensor(model.native_image_size, dtype=torch.int64)
    sd["context_length"] = torch.tensor(sd["positional_embedding"].shape[0], dtype=torch.int64)
    sd["vocab_size"] = torch.tensor(sd["token_embedding.weight"].shape[0], dtype=torch.int64)
    return sd


def write(model: "DenseCLIP", out: Path) -> None:
    write_tensors(to_openai_state_dict(model), out)


LAYOUT = Layout(
    name="openai",
    description="OpenAI CLIP state dict (open_clip names + input_resolution/context_length/vocab_size)",
    detect=detect,
    convert=convert,
    incompatibility=incompatibility,
    outputs=outputs,
    write=write,
)
