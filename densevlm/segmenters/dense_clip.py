"""The dense-CLIP segmenter (MaskCLIP's training-free protocol on our value-path dense map).

Every patch token of :meth:`DenseCLIP.encode_dense` (the last block on its value path, final norm, projection,
L2 normalisation: what DenseVLM/CLIPSelf align) is scored by cosine against the class text embeddings; the
(h, w) patch grid of scores is upsampled bilinearly to the input size.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from densevlm.segmenters.base import Segmenter, pad_to_patches, upsample_to_input
from densevlm.segmenters.registry import register_segmenter
from densevlm.vocab.commands import text_embeddings_from_config


@register_segmenter("dense_clip")
class DenseCLIPSegmenter(Segmenter):
    """Cosine of every patch of a :class:`densevlm.models.DenseCLIP` dense map with each class embedding.

    Args:
        model: any backbone of :func:`densevlm.models.create_backbone`.
        text_embeddings: (C, D) class embeddings (normalised here), in ``class_names`` order.
        class_names: the C classes.
        last_block: "value" or "standard" (default: the model's ``dense_last_block``).

    Images whose sides are not multiples of the patch size are padded right and bottom with zeros (the mean
    colour once normalised) and the padded part of the logits is cut off, so every pixel is scored from the
    patch that covers it.
    """

    def __init__(self, model: Any, text_embeddings: torch.Tensor, class_names: Sequence[str], *,
                 last_block: Optional[str] = None) -> None:
        super().__init__()
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != model.embed_dim:
            raise ValueError(f"text embeddings: expected (C, {model.embed_dim}) for model {model.name!r}, got "
                             f"{tuple(text_embeddings.shape)}")
        self.model = model
        self.class_names = self._check_names(class_names, text_embeddings.shape[0])
        self.register_buffer("text", F.normalize(text_embeddings.detach().float(), dim=-1), persistent=False)
        self.last_block = last_block
        self.image_mean, self.image_std = tuple(model.image_mean), tuple(model.image_std)

    @classmethod
    def from_config(cls, cfg: Any, text_vocabulary: Any, *, model: Any,
                    progress: bool = True) -> "DenseCLIPSegmenter":
        """The segmenter of an eval config over ``model``: the text embeddings of ``text_vocabulary`` as
        ``cfg.text`` (a :class:`~densevlm.config.vocab.TextEmbeddingConfig`) says (templates, cache, file)."""
        vocabulary, text = text_embeddings_from_config(model, cfg.text, text_vocabulary, progress=progress)
        return cls(model, text, vocabulary.names)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        padded = pad_to_patches(images, self.model.patch_size)
        dense = self.model.encode_dense(padded, last_block=self.last_block)  # (B, D, h/p, w/p), unit norm
        logits = torch.einsum("bdhw,cd->bchw", dense.float(), self.text.to(dense.device))
        return upsample_to_input(logits, padded, images.shape[-2:])
