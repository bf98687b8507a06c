"""Dense path for open_clip's ``VisionTransformer`` (OpenAI / OpenCLIP layout: ViT-B-16, ViT-L-14(-336), toy).

Mirrors the reference ``VisionTransformer.encode_dense`` of CLIPSelf/DenseVLM (``transformer.py``): ``conv1``
patches, class token, position embedding resized bicubically to the grid, ``ln_pre``, blocks[:-1], the last
block's value path (``in_proj`` value rows then ``out_proj``, the MaskCLIP "v2" extraction), ``ln_post`` on the
patch tokens, ``@ proj``. Patch dropout is never applied here: dense features need every token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock, VisionTransformer
from torch import nn

from densevlm.models.decoupled import decoupled_attention
from densevlm.models.dense_clip import DenseCLIP


class OpenCLIPViTDense(DenseCLIP):
    """:class:`DenseCLIP` for open_clip ``CLIP`` models whose vision tower is a ``VisionTransformer``."""

    family = "openclip_vit"

    @property
    def _visual(self) -> VisionTransformer:
        return self.clip.visual

    def _check_supported(self) -> None:
        visual = self.clip.visual
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"{self.name}: vision tower is {type(visual).__name__}, expected open_clip VisionTransformer")
        if visual.patch_size[0] != visual.patch_size[1]:
            raise TypeError(f"{self.name}: non-square patches {tuple(visual.patch_size)} are not supported")
        if visual.attn_pool is not None:
            raise TypeError(f"{self.name}: attentional pooling towers have no per-token projection; not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise TypeError(f"{self.name}: pool_type {visual.pool_type!r} not supported (expected 'tok' or 'avg')")
        if visual.proj is None:
            raise TypeError(f"{self.name}: vision tower has no 'proj'; dense features would not be in the text space")
        for i, block in enumerate(visual.transformer.resblocks):
            if isinstance(block, ResidualAttentionBlock):
                if not block.attn._qkv_same_embed_dim or hasattr(block, "ln_1_kv"):
                    raise TypeError(f"{self.name}: block {i} uses separate q/k/v projections; not supported")
            elif not isinstance(block, CustomResidualAttentionBlock):
                raise TypeError(f"{self.name}: block {i} is a {type(block).__name__}; not supported")

    @property
    def patch_size(self) -> int:
        return int(self._visual.patch_size[0])

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple(self._visual.grid_size)

    def visual_blocks(self) -> list[nn.Module]:
        return list(self._visual.transformer.resblocks)

    def _patch_weight(self) -> torch.Tensor:
        return self._visual.conv1.weight

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], Any]:
        visual = self._visual
        x = visual.conv1(images)  # (B, width, h, w); a remainder smaller than a patch is dropped
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._pos_embed_for_grid(visual.positional_embedding, (h, w)).to(x.dtype)
        x = visual.ln_pre(x)
        # open_clip >= 2.26 runs blocks batch-first; older configs may still build sequence-first transformers
        return x, (h, w), {"batch_first": getattr(visual.transformer, "batch_first", True)}

    @staticmethod
    def _call(fn, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        if ctx["batch_first"]:
            return fn(x)
        return fn(x.transpose(0, 1)).transpose(0, 1)

    def _block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self._call(block, x, ctx)

    def _block_value_path(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        # Every op here is per token, so the sequence layout does not matter.
        attn = block.attn
        dim = attn.out_proj.in_features
        h = block.ln_1(x)
        bias = attn.in_proj_bias[2 * dim:] if attn.in_proj_bias is not None else None
        v = F.linear(h, attn.in_proj_weight[2 * dim:], bias)
        if isinstance(block, CustomResidualAttentionBlock):
            if attn.head_scale is not None:  # per-head output scaling applies to the attended values
                shape = v.shape
                v = (v.unflatten(-1, (attn.num_heads, -1)) * attn.head_scale.squeeze(-1)).reshape(shape)
            v = attn.ln_inner(v)
            out = block.ln_attn(attn.out_drop(attn.out_proj(v)))
        else:
            out = attn.out_proj(v)
        x = x + block.ls_1(out)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _block_decoupled(self, block: nn.Module, x: torch.Tensor, ctx: Any,
                         mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The released open_clip ``ss_attn``: ln_1, the fused in_proj, per-head self-self attention scaled by
        # head_dim^-0.5, out_proj, ls_1; no residual, no MLP. Per token and per head, so the layout is free.
        attn = block.attn
        b, t, dim = x.shape
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, d)
        out = decoupled_attention(q, k, v, mode, q.shape[-1] ** -0.5)
        if isinstance(block, CustomResidualAttentionBlock) and attn.head_scale is not None:
            out = out * attn.head_scale  # (heads, 1, 1): per-head output scaling, as its attention applies it
        out = out.transpose(1, 2).reshape(b, t, dim)
        if isinstance(block, CustomResidualAttentionBlock):
            out = block.ln_attn(attn.out_drop(attn.out_proj(attn.ln_inner(out))))
        else:
            out = attn.out_proj(out)
        return block.ls_1(out), q, k, v

    def _project_image(self, tokens: torch.Tensor) -> torch.Tensor:
        visual = self._visual
        if visual.final_ln_after_pool:
            pooled = tokens[:, 0] if visual.pool_type == "tok" else tokens[:, 1:].mean(dim=1)
            pooled = visual.ln_post(pooled)
        else:
            tokens = visual.ln_post(tokens)
            pooled = tokens[:, 0] if visual.pool_type == "tok" else tokens[:, 1:].mean(dim=1)
        return pooled @ visual.proj

    def _project_dense(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        visual = self._visual
        return visual.ln_post(patch_tokens) @ visual.proj
