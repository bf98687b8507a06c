"""Position information at any input size, computed exactly as the CLIPSelf / DenseVLM reference does.

This module is the single place that holds the reference numerics for running a ViT at a token grid other
than the one it was trained on. Both families use it: the OpenAI-layout ViT (absolute position embedding only)
and EVA02 (absolute position embedding plus 2-D rotary embedding).

Why not timm's own resampling helpers? timm's ``resample_abs_pos_embed`` calls ``F.interpolate(...,
antialias=True)``. With ``antialias=True`` PyTorch's bicubic kernel uses the PIL coefficient a = -0.5, while the
reference (``rescale_positional_embedding`` in ``eva_vit_model.py`` and ``transformer.py``) uses the plain
bicubic kernel (a = -0.75, ``antialias=False``). On the golden tiny EVA that alone moves the 320-px dense map by
1.8e-3 (max abs, unit-norm features); reproducing the reference kernel brings it to float32 noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_abs_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize a (prefix + h*w, C) absolute position embedding to a new token grid, the reference way.

    The prefix (CLS) slots are copied unchanged; the grid part is resized with bicubic interpolation,
    ``align_corners=False`` and no antialiasing (see the module docstring). At the native grid the input is
    returned as is (the reference does no interpolation there either), so gradients flow to the parameter.

    Args:
        pos_embed: (N, C) or (1, N, C) embedding with ``num_prefix_tokens + old_h * old_w`` rows.
        old_grid: (h, w) grid the embedding was trained for.
        new_grid: (h, w) grid wanted.
        num_prefix_tokens: leading rows that are not part of the grid (1 for a CLS token).

    Returns:
        An embedding of the same rank as ``pos_embed`` with ``num_prefix_tokens + new_h * new_w`` rows.
    """
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    batched = pos_embed.ndim == 3
    table = pos_embed[0] if batched else pos_embed
    if table.shape[0] != num_prefix_tokens + old_h * old_w:
        raise ValueError(
            f"position embedding has {table.shape[0]} rows, expected {num_prefix_tokens} prefix + "
            f"{old_h}x{old_w} grid = {num_prefix_tokens + old_h * old_w}"
        )
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    prefix, grid = table[:num_prefix_tokens], table[num_prefix_tokens:]
    orig_dtype = grid.dtype
    # (h*w, C) -> (1, C, h, w): the channel-major view the reference builds with `.T.contiguous().view(...)`.
    grid = grid.T.reshape(1, -1, old_h, old_w)
    # Interpolate in float32 at least: CPU bicubic has no fp16 kernel, and for fp32 models this is exactly
    # the reference computation.
    grid = F.interpolate(
        grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=False
    )
    grid = grid.reshape(-1, new_h * new_w).T.to(orig_dtype)
    out = torch.cat([prefix, grid], dim=0)
    return out.unsqueeze(0) if batched else out


def reference_rope_angles(
    grid: tuple[int, int],
    head_dim: int,
    pretrain_grid: tuple[int, int] | None,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """RoPE angles (h*w, head_dim) for a token grid, following the reference ``VisionRotaryEmbeddingFast``.

    The reference (``rope.py``, with ``intp_freq=True``) builds, for a grid side ``n``, positions
    ``t = arange(n) / n * pt_seq_len``: the grid is always stretched over the pre-training extent
    ``pt_seq_len`` (16 for EVA02-CLIP B/16 and L/14-336), so a larger input gets finer, not larger,
    positions. Frequencies are ``1 / theta ** (arange(0, d, 2)[: d // 2] / d)`` with ``d = head_dim // 2``;
    each is repeated twice (interleaved pairs, matching the interleaved ``rotate_half``), and the row-axis
    angles are concatenated before the column-axis angles. ``recalculate()`` in the reference only handles
    square grids (``int(sqrt(N))``); here each axis uses its own length, which equals the reference on square
    grids and is the natural extension on rectangular ones. The float32 operations are done in the reference
    order, on the CPU, so the table is bit-identical to the reference's buffers.

    Args:
        grid: (h, w) token grid.
        head_dim: attention head width; must be divisible by 4.
        pretrain_grid: (h, w) extent positions are stretched over (timm's ``ref_feat_shape``); ``None``
            uses raw indices ``arange(n)``.
        temperature: RoPE base (theta).
    """
    if head_dim % 4:
        raise ValueError(f"RoPE head_dim must be divisible by 4, got {head_dim}")
    h, w = grid
    half = head_dim // 2
    inv_freq = 1.0 / (temperature ** (torch.arange(0, half, 2)[: half // 2].float() / half))

    def axis_angles(n: int, ref: int | None) -> torch.Tensor:
        t = torch.arange(n) / n * ref if ref is not None else torch.arange(n).float()
        return torch.einsum("i,f->if", t, inv_freq).repeat_interleave(2, dim=-1)

    ref_h, ref_w = pretrain_grid if pretrain_grid is not None else (None, None)
    rows = axis_angles(h, ref_h)[:, None, :].expand(h, w, half)
    cols = axis_angles(w, ref_w)[None, :, :].expand(h, w, half)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, head_dim)


def reference_rope_sincos(
    grid: tuple[int, int],
    head_dim: int,
    pretrain_grid: tuple[int, int] | None,
    temperature: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) tables of shape (h*w, head_dim) for :func:`reference_rope_angles`."""
    angles = reference_rope_angles(grid, head_dim, pretrain_grid, temperature)
    return angles.sin(), angles.cos()
