"""Dense path for open_clip's EVA02 models (timm ``Eva`` trunk inside ``TimmModel``, ``CustomTextCLIP``).

Mirrors the reference ``EVAVisionTransformer.encode_dense`` (CLIPSelf/DenseVLM ``eva_vit_model.py``) on the
timm modules: patch embedding, CLS token, the absolute position embedding resized bicubically to the grid,
RoPE tables recomputed for the grid with the reference formula (:mod:`densevlm.models.positional`),
blocks[:-1], the last block's value path (``v_proj`` + bias -> sub-LN ``attn.norm`` -> ``attn.proj``, then the
MLP residual; no q·k), final ``norm`` on the patch tokens, ``head``.

The module also registers the timm trunk ``eva02_tiny_d3_patch16_clip_224`` used by the ``EVA02-Ti-16-golden``
open_clip config: the EVA02-CLIP-B/16 recipe shrunk to the golden fixture's size.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from open_clip.timm_model import TimmModel
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat
from timm.models import register_model
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from densevlm.models.decoupled import decoupled_attention
from densevlm.models.dense_clip import DenseCLIP
from densevlm.models.positional import reference_rope_sincos

__all__ = ["EvaDense", "eva02_tiny_d3_patch16_clip_224", "eva02_trunk_name", "register_eva02_trunk"]


@register_model
def eva02_tiny_d3_patch16_clip_224(pretrained: bool = False, **kwargs: Any) -> Eva:
    """EVA02-CLIP recipe at width 192, 3 heads (head width 64), 3 blocks, patch 16, 224 px.

    SwiGLU MLP (hidden 512) with sub-LN, sub-LN in attention, separate q/k/v projections, RoPE with a 16x16
    pre-training grid: the architecture of the golden fixture ``EVA02-CLIP-tiny-16.json``. There are no
    pretrained timm weights; load CLIP checkpoints through ``densevlm.models.create_backbone``.
    """
    if pretrained:
        raise ValueError("eva02_tiny_d3_patch16_clip_224 has no pretrained timm weights; load a CLIP checkpoint instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model passes these to every entrypoint
    args: dict[str, Any] = dict(
        img_size=224,
        patch_size=16,
        embed_dim=192,
        depth=3,
        num_heads=3,
        qkv_fused=False,
        mlp_ratio=4 * 2 / 3,  # int(192 * 8 / 3) == 512, as the reference's mlp_ratio 2.6667
        swiglu_mlp=True,
        scale_mlp=True,
        scale_attn_inner=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(16, 16),
        global_pool="token",
    )
    args.update(kwargs)
    return Eva(**args)


#: timm names of EVA02-CLIP trunks of any size: the name spells the whole architecture, so a config that names one
#: (an export's open_clip config, a local-dir folder) can be built in a fresh process: see register_eva02_trunk.
_TRUNK_NAME = re.compile(
    r"^densevlm_eva02_w(?P<w>\d+)_d(?P<d>\d+)_h(?P<h>\d+)_p(?P<p>\d+)_i(?P<i>\d+)_m(?P<m>\d+)_r(?P<r>\d+)"
    r"_(?P<subln>[sn])(?P<bias>[bu])(?P<ls>l?)$"
)


def eva02_trunk_name(*, width: int, depth: int, heads: int, patch: int, image: int, mlp_hidden: int,
                     rope_pretrain_grid: int, subln: bool, qkv_bias: bool, layer_scale: bool) -> str:
    """The timm name of an EVA02-CLIP trunk (q/k/v split, SwiGLU MLP; ``rope_pretrain_grid`` 0 = no RoPE)."""
    return (f"densevlm_eva02_w{width}_d{depth}_h{heads}_p{patch}_i{image}_m{mlp_hidden}_r{rope_pretrain_grid}_"
            f"{'s' if subln else 'n'}{'b' if qkv_bias else 'u'}{'l' if layer_scale else ''}")


def register_eva02_trunk(name: str) -> bool:
    """Register the timm entrypoint for a name made by :func:`eva02_trunk_name`; False if the name is not one."""
    import timm

    match = _TRUNK_NAME.match(name)
    if match is None:
        return False
    if timm.is_model(name):
        return True
    g = {k: int(v) for k, v in match.groupdict().items() if v.isdigit()}
    args: dict[str, Any] = dict(
        img_size=g["i"], patch_size=g["p"], embed_dim=g["w"], depth=g["d"], num_heads=g["h"], qkv_fused=False,
        qkv_bias=match["bias"] == "b",
        mlp_ratio=(g["m"] + 0.5) / g["w"],  # timm builds int(width * mlp_ratio) hidden units
        swiglu_mlp=True, scale_mlp=match["subln"] == "s", scale_attn_inner=match["subln"] == "s",
        use_rot_pos_emb=g["r"] > 0, ref_feat_shape=(g["r"], g["r"]) if g["r"] else None,
        init_values=1.0 if match["ls"] else None,
    )

    def entry(pretrained: bool = False, **kwargs: Any) -> Eva:
        if pretrained:
            raise ValueError(f"{name} has no pretrained timm weights; load a CLIP checkpoint instead")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)  # timm.create_model passes these to every entrypoint
        return Eva(**{**args, "global_pool": kwargs.pop("global_pool", "token"), **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"EVA02-CLIP trunk {args}"
    register_model(entry)
    return True


class EvaDense(DenseCLIP):
    """:class:`DenseCLIP` for open_clip models whose vision tower is a timm ``Eva`` trunk (EVA02)."""

    family = "eva"

    @property
    def _trunk(self) -> Eva:
        return self.clip.visual.trunk

    def _check_supported(self) -> None:
        visual = self.clip.visual
        trunk = getattr(visual, "trunk", None)
        if not isinstance(visual, TimmModel) or not isinstance(trunk, Eva):
            raise TypeError(f"{self.name}: vision tower is not a timm Eva trunk in open_clip's TimmModel")
        problems = []
        if trunk.cls_token is None or trunk.reg_token is not None or trunk.no_embed_class:
            problems.append("exactly one class token with a position-embedding slot is required")
        if trunk.pos_embed is None:
            problems.append("an absolute position embedding is required")
        if trunk.global_pool != "token" or trunk.attn_pool is not None or not isinstance(trunk.fc_norm, nn.Identity):
            problems.append(f"class-token pooling is required (global_pool={trunk.global_pool!r})")
        if trunk.patch_embed.patch_size[0] != trunk.patch_embed.patch_size[1]:
            problems.append(f"square patches are required, got {tuple(trunk.patch_embed.patch_size)}")
        for i, block in enumerate(trunk.blocks):
            if type(block) is not EvaBlock or type(block.attn) is not EvaAttention:
                problems.append(f"block {i} is {type(block).__name__}/{type(block.attn).__name__}, expected pre-norm EvaBlock")
                break
        rope = trunk.rope
        if rope is not None:
            if not isinstance(rope, RotaryEmbeddingCat):
                problems.append(f"RoPE {type(rope).__name__} is not the EVA02 axial RoPE")
            elif (rope.in_pixels or getattr(rope, "grid_type", "index") != "index" or rope.grid_offset
                  or rope.grid_indexing != "ij" or getattr(rope, "rotate_half", False)
                  or getattr(rope, "aug_active", False)):  # attributes absent in older timm mean the defaults
                problems.append("RoPE settings differ from EVA02's (index grid, no offset, 'ij', interleaved)")
        if problems:
            raise TypeError(f"{self.name}: the dense path cannot reproduce this Eva trunk: " + "; ".join(problems))

    @property
    def patch_size(self) -> int:
        return int(self._trunk.patch_embed.patch_size[0])

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple(self._trunk.patch_embed.grid_size)

    def visual_blocks(self) -> list[nn.Module]:
        return list(self._trunk.blocks)

    def _patch_weight(self) -> torch.Tensor:
        return self._trunk.patch_embed.proj.weight

    def _rope_table(self, grid: tuple[int, int], device: torch.device) -> Optional[torch.Tensor]:
        rope = self._trunk.rope
        if rope is None:
            return None

        def compute() -> torch.Tensor:
            ref = tuple(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
            # Built on the CPU in float32, as the reference does, then moved: identical on every device.
            sin, cos = reference_rope_sincos(grid, rope.dim, ref, float(rope.temperature))
            return torch.cat([sin, cos], dim=-1).to(device)  # timm's apply_rot_embed_cat layout

        return self._cached_aux(("rope", grid, device), compute)

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], Any]:
        trunk = self._trunk
        patch_embed = trunk.patch_embed
        # Call the conv directly: timm's PatchEmbed asserts the configured image size, the dense path takes any.
        x = patch_embed.proj(images)
        b, _, h, w = x.shape
        x = patch_embed.norm(x.flatten(2).transpose(1, 2))
        x = torch.cat([trunk.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        x = x + self._pos_embed_for_grid(trunk.pos_embed, (h, w)).to(x.dtype)
        x = trunk.norm_pre(trunk.pos_drop(x))
        return x, (h, w), self._rope_table((h, w), x.device)

    def _block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return block(x, rope=ctx)

    def _block_value_path(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        attn = block.attn
        h = block.norm1(x)
        if attn.qkv is not None:  # fused q/k/v weights: the value rows are the last third
            dim = attn.proj.in_features
            v = nn.functional.linear(h, attn.qkv.weight[2 * dim:], attn.v_bias)
        else:
            v = attn.v_proj(h)
        v = attn.norm(v)  # sub-LN (reference: inner_attn_ln)
        if attn.gate is not None:
            v = v * attn.gate(h).sigmoid()
        out = attn.proj_drop(attn.proj(v))
        if block.gamma_1 is not None:
            out = block.gamma_1 * out
        x = x + block.drop_path1(out)
        mlp = block.mlp(block.norm2(x))
        if block.gamma_2 is not None:
            mlp = block.gamma_2 * mlp
        return x + block.drop_path2(mlp)

    def _block_decoupled(self, block: nn.Module, x: torch.Tensor, ctx: Any,
                         mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The released EVA ``forward_without_rcffn`` / ``ss_attn``: norm1, q (+ q bias), k (no bias), v (+ v bias),
        # self-self attention WITHOUT the scale and WITHOUT RoPE (both as released), sub-LN, proj, gamma_1; no
        # residual, no MLP.
        attn = block.attn
        b, t, _ = x.shape
        h = block.norm1(x)
        if attn.qkv is not None:  # fused weights; timm keeps a zero k bias buffer, as the reference's
            bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            q, k, v = nn.functional.linear(h, attn.qkv.weight, bias).reshape(b, t, 3, attn.num_heads, -1).unbind(2)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = (z.reshape(b, t, attn.num_heads, -1).transpose(1, 2) for z in (q, k, v))
        q, k = attn.q_norm(q), attn.k_norm(k)  # identities in EVA02
        out = decoupled_attention(q, k, v, mode, 1.0).transpose(1, 2).reshape(b, t, -1)
        out = attn.norm(out)
        if attn.gate is not None:
            out = out * attn.gate(h).sigmoid()
        out = attn.proj_drop(attn.proj(out))
        if block.gamma_1 is not None:
            out = block.gamma_1 * out
        return block.drop_path1(out), q, k, v

    def _project_image(self, tokens: torch.Tensor) -> torch.Tensor:
        trunk = self._trunk
        return self.clip.visual.head(trunk.forward_head(trunk.norm(tokens)))

    def _project_dense(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        trunk = self._trunk
        return self.clip.visual.head(trunk.head(trunk.norm(patch_tokens)))
