"""The Talk2DINO segmenter: ψ(class text) against every patch token of a frozen backbone.

Per class, the CLIP text embeddings of its prompts are averaged in CLIP space (raw ``encode_text`` outputs, the
space ψ was trained on), mapped by ψ and L2-normalised; every final-norm patch token is scored by cosine, the
scores go through a sigmoid (so the constant background channel, ``bg_thresh`` 0.55 for ViT-B / 0.54 for ViT-L,
lives in (0, 1)), optionally the attention-based background cleaning mixes in each class's head-weighted
attention map, the patch grid is upsampled bilinearly to the input size and optionally refined by PAMR.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from densevlm.models.patch_attention import PatchBackbone, PatchFeatures, create_patch_backbone
from densevlm.segmenters.base import Segmenter, pad_to_patches, upsample_to_input
from densevlm.segmenters.registry import register_segmenter
from densevlm.vocab.templates import get_templates
from densevlm.vocab.embeddings import class_prompts, encode_texts


@torch.no_grad()
def clip_space_class_embeddings(text_model: Any, vocabulary: Any, templates: Any, *,
                                batch_size: int = 256) -> torch.Tensor:
    """(C, T): per class, the mean of the raw CLIP text embeddings over its names and templates (not normalised)."""
    prompts = class_prompts(vocabulary, templates)
    flat = [s for cls in prompts for names in cls for s in names]
    emb = encode_texts(text_model, flat, batch_size=batch_size, normalize=False)
    rows, i = [], 0
    for cls in prompts:
        n = sum(len(names) for names in cls)
        rows.append(emb[i:i + n].mean(dim=0))
        i += n
    return torch.stack(rows)


def background_clean(mask: torch.Tensor, features: PatchFeatures, text: torch.Tensor, lam: float) -> torch.Tensor:
    """Talk2DINO's attention-based cleaning of (B, C, N) sigmoid masks.

    Per image: each head's embedding ``ê_m = normalize(Σ_p A_m[p] F[p])`` (raw logits, raw tokens); per class a
    distribution over heads ``w = softmax_m <t, ê_m>``; the class map ``softmax_p(Σ_m w_m A_m)``, min-max
    normalised over the image's maps and rescaled to the image's mask range; then ``(mask + λ·map) / (1 + λ)``.
    """
    heads = F.normalize(torch.einsum("bhn,bnd->bhd", features.attn, features.tokens), dim=-1)
    weights = torch.einsum("cd,bhd->bch", text, heads).softmax(dim=-1)
    maps = torch.einsum("bch,bhn->bcn", weights, features.attn).softmax(dim=-1)
    lo = maps.amin(dim=(1, 2), keepdim=True)
    hi = maps.amax(dim=(1, 2), keepdim=True)
    maps = (maps - lo) / (hi - lo).clamp_min(1e-12)
    m_lo, m_hi = mask.amin(dim=(1, 2), keepdim=True), mask.amax(dim=(1, 2), keepdim=True)
    maps = maps * (m_hi - m_lo) + m_lo
    return (mask + lam * maps) / (1.0 + lam)


def _neighbours(x: torch.Tensor, d: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 8, H, W): the 8 neighbours at dilation ``d`` (border replicated)."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (d, d, d, d), mode="replicate")
    return torch.stack([xp[..., d + dy * d:d + dy * d + h, d + dx * d:d + dx * d + w]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], dim=2)


@torch.no_grad()
def pamr(image: torch.Tensor, mask: torch.Tensor, *, iterations: int = 10,
         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), class_chunk: int = 30) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as Talk2DINO applies it.

    Each pixel's affinity to its 8 neighbours at every dilation is ``-|I_n - I| / (0.1 σ)`` (σ: the colour spread of
    that 3x3 neighbourhood), averaged over colour channels and softmax-normalised over all neighbours; the (B, C, H, W)
    masks are then averaged over the neighbours with these weights ``iterations`` times, so they follow image edges.
    Classes are refined ``class_chunk`` at a time (memory).
    """
    image = image.float()
    diffs, stds = [], []
    for d in dilations:
        n = _neighbours(image, d)
        diffs.append((n - image[:, :, None]).abs())
        spread = torch.cat([n, image[:, :, None]], dim=2).std(dim=2, keepdim=True)
        stds.append(spread.expand_as(n))
    aff = (-torch.cat(diffs, 2) / (1e-8 + 0.1 * torch.cat(stds, 2))).mean(dim=1, keepdim=True).softmax(dim=2)
    weights = aff.split(8, dim=2)  # per dilation: its 8 neighbours (kept apart, so memory is 8 maps per class)
    out = []
    for chunk in mask.float().split(class_chunk, dim=1):
        for _ in range(iterations):
            chunk = sum((_neighbours(chunk, d) * w).sum(dim=2) for d, w in zip(dilations, weights))
        out.append(chunk)
    return torch.cat(out, dim=1)


@register_segmenter("talk2dino")
class Talk2DINOSegmenter(Segmenter):
    """sigmoid(cos(patch token, ψ(class text))) per class, at the input size.

    Args:
        backbone: the frozen :class:`~densevlm.models.patch_attention.PatchBackbone` ψ was trained on.
        psi: the trained :class:`~densevlm.methods.talk2dino.Talk2DINOProjection`.
        class_text: (C, T) template-averaged CLIP text embeddings (:func:`clip_space_class_embeddings`).
        class_names: the C classes.
        bg_clean, lambda_bg: the attention-based background cleaning and its weight.
        pamr: refine the upsampled masks with :func:`pamr` on the (normalised) input image.

    Images whose sides are not multiples of the patch size are padded right and bottom (zeros, the mean colour
    once normalised) and the padded part of the scores is cut off.
    """

    def __init__(self, backbone: PatchBackbone, psi: torch.nn.Module, class_text: torch.Tensor,
                 class_names: Sequence[str], *, bg_clean: bool = False, lambda_bg: float = 0.2,
                 pamr: bool = False) -> None:
        super().__init__()
        if class_text.ndim != 2 or class_text.shape[1] != psi.in_dim:
            raise ValueError(f"class text embeddings: expected (C, {psi.in_dim}) for ψ, got {tuple(class_text.shape)}")
        if psi.out_dim != backbone.embed_dim:
            raise ValueError(f"ψ maps into {psi.out_dim} dimensions but backbone {backbone.name} has "
                             f"{backbone.embed_dim}-dimensional tokens; was it trained for another backbone?")
        self.backbone = backbone
        self.class_names = self._check_names(class_names, class_text.shape[0])
        self.bg_clean, self.lambda_bg, self.pamr = bool(bg_clean), float(lambda_bg), bool(pamr)
        device = next(backbone.parameters()).device
        with torch.no_grad():
            psi = psi.to(device).float().eval()
            text = F.normalize(psi(class_text.float().to(device)), dim=-1)
        self.register_buffer("text", text, persistent=False)
        self.image_mean, self.image_std = tuple(backbone.image_mean), tuple(backbone.image_std)

    @classmethod
    def from_config(cls, cfg: Any, text_vocabulary: Any, *, psi: torch.nn.Module, vision: Any, text_model: Any,
                    device: Optional[torch.device] = None, progress: bool = True) -> "Talk2DINOSegmenter":
        """The segmenter of an eval config (``segmenter: talk2dino``) from plain arguments.

        Args:
            cfg: the :class:`~densevlm.config.semseg.SemSegEvalConfig`; its ``talk2dino`` thresholds
                (``bg_clean``, ``lambda_bg``, ``pamr``) and ``text`` templates are used.
            text_vocabulary: the classes scored (background rule's class left out).
            psi: the loaded ψ; vision: the backbone's :class:`~densevlm.config.talk2dino.Talk2DINOVisionConfig`;
            text_model: the CLIP text model ψ was trained on (the caller reads a run directory's recipe for them).
        """
        backbone = create_patch_backbone(vision, device=device or "cpu")
        templates = get_templates(cfg.text.templates, this_is_prefix=cfg.text.this_is_prefix)
        class_text = clip_space_class_embeddings(text_model, text_vocabulary, templates,
                                                 batch_size=cfg.text.batch_size)
        t = cfg.talk2dino
        return cls(backbone, psi, class_text, text_vocabulary.names, bg_clean=t.bg_clean, lambda_bg=t.lambda_bg,
                   pamr=t.pamr)

    @property
    def model(self) -> PatchBackbone:
        """The backbone (what evaluation results name as the segmenter's model)."""
        return self.backbone

    def scores(self, images: torch.Tensor) -> tuple[torch.Tensor, PatchFeatures]:
        """(B, C, h, w) masks on the patch grid of (already padded) images, and the backbone's features."""
        feats = self.backbone(images)
        cos = torch.einsum("bnd,cd->bcn", F.normalize(feats.tokens, dim=-1), self.text.to(feats.tokens.device))
        mask = cos.sigmoid()
        if self.bg_clean:
            mask = background_clean(mask, feats, self.text.to(mask.device), self.lambda_bg)
        return mask.reshape(mask.shape[0], mask.shape[1], *feats.grid), feats

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        padded = pad_to_patches(images, self.backbone.patch_size)
        mask, _ = self.scores(padded)
        mask = upsample_to_input(mask, padded, images.shape[-2:])
        return pamr(images, mask) if self.pamr else mask
