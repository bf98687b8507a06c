"""DeCLIP's decoupled last block (arXiv 2505.04410): self-self attention over the values, no residual, no MLP.

DeCLIP replaces the last block of the CLIP vision tower by an attention whose weights come from one projection
compared with itself (q·q, k·k, v·v, or a mix) and drops the block's residual and MLP; its "content" features are
that block's output through the tower's final norm and projection, its "context" features the block's own
q / k / v tokens. The released code (``xiaomoguhz/DeCLIP``, ``ss_attn`` / ``csa_attn``) defines the modes:

* ``qq``: softmax(s·q qᵀ) v; ``kk``: softmax(s·k kᵀ) v; ``vv``: softmax(s·v vᵀ) v;
* ``csa``: (softmax(s·q qᵀ) + softmax(s·k kᵀ)) v (a sum, as released, not a mean);
* ``all``: softmax(s·(q qᵀ + k kᵀ + v vᵀ) / 3) v.

The scale ``s`` is the family's: head_dim^-0.5 for open_clip ViTs (their ``ss_attn``), 1 for EVA02 (the released
EVA ``ss_attn`` has the scale commented out, and it skips RoPE). The released open_clip block implements only
``qq``, ``kk`` and ``csa``; ``vv`` and ``all`` follow the EVA definitions there, with the open_clip scale.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

DecoupledMode = Literal["qq", "kk", "vv", "csa", "all"]
#: DeCLIP's modes, in the order the released ``--mode`` choices list them.
DECOUPLED_MODES: tuple[str, ...] = ("qq", "kk", "vv", "csa", "all")


def _gram(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x @ x.transpose(-2, -1) * scale


#: mode -> (q, k, v, scale) -> (B, heads, T, T) attention weights.
_WEIGHTS: dict[str, Callable[..., torch.Tensor]] = {
    "qq": lambda q, k, v, s: _gram(q, s).softmax(dim=-1),
    "kk": lambda q, k, v, s: _gram(k, s).softmax(dim=-1),
    "vv": lambda q, k, v, s: _gram(v, s).softmax(dim=-1),
    "csa": lambda q, k, v, s: _gram(q, s).softmax(dim=-1) + _gram(k, s).softmax(dim=-1),
    "all": lambda q, k, v, s: ((_gram(q, s) + _gram(k, s) + _gram(v, s)) / 3.0).softmax(dim=-1),
}
assert tuple(_WEIGHTS) == DECOUPLED_MODES


def decoupled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    """(B, heads, T, d) q, k, v -> (B, heads, T, d) values attended with the mode's self-self weights."""
    if mode not in _WEIGHTS:
        raise ValueError(f"decoupled mode: expected one of {list(DECOUPLED_MODES)}, got {mode!r}")
    return _WEIGHTS[mode](q, k, v, scale) @ v
