"""Round-trip check of an export: reload it through its layout's reader and compare with the model.

It sits above both :mod:`densevlm.models.layouts` (which writes and reads the files) and
:mod:`densevlm.models.factory` (which builds the reloaded model), so neither needs the other's help.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from densevlm.models.factory import create_backbone
from densevlm.models.layouts import reload_spec

if TYPE_CHECKING:
    from densevlm.models.dense_clip import DenseCLIP


def verify_export(model: "DenseCLIP", layout_name: str, out: str | Path, *, seed: int = 0) -> dict[str, float]:
    """Reload an export through the layout's reader and compare it with ``model``.

    Returns the max abs differences of the dense map (at the native size and at 1.5x, which exercises the
    position-embedding and RoPE interpolation), the image and the text embeddings.
    """
    reloaded = create_backbone(reload_spec(model, layout_name, out))
    device = next(model.parameters()).device
    reloaded = reloaded.to(device)
    gen = torch.Generator().manual_seed(seed)
    size = model.native_image_size
    big = size * 3 // 2 // model.patch_size * model.patch_size
    images = torch.randn(1, 3, size, size, generator=gen).to(device)
    images_big = torch.randn(1, 3, big, big, generator=gen).to(device)
    tokens = model.tokenizer(["a photo of a cat.", "wall, brick"])
    with torch.no_grad():
        return {
            "dense": (reloaded.encode_dense(images) - model.encode_dense(images)).abs().max().item(),
            f"dense_{big}px": (reloaded.encode_dense(images_big) - model.encode_dense(images_big)).abs().max().item(),
            "image": (reloaded.encode_image(images) - model.encode_image(images)).abs().max().item(),
            "text": (reloaded.encode_text(tokens) - model.encode_text(tokens)).abs().max().item(),
        }
