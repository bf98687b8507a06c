"""A DenseVLM-tuned CLIP ViT as a detectron2 ``Backbone``: F-ViT's multi-scale pyramid plus the dense CLIP map.

The pyramid is F-ViT's (``EvaCLIPViT``; ViTDet's simple feature pyramid does the same from one block): the tokens
after four blocks, reshaped to maps at stride 16, become strides 4 (two 2x transposed convolutions with a norm and
GELU between), 8 (one transposed convolution), 16 (as is) and 32 (2x max pooling). The last block runs on the
dense path the model was aligned on (value path, no q·k; F-ViT's ``forward_without_attn``), and its tokens, after
the final norm and projection and L2 normalisation, are ``clip``: the dense map in the text space, to classify
regions against class text embeddings (:func:`densevlm.integrations.detectron2.class_text_embeddings`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from densevlm.models import DenseCLIP, create_backbone
from densevlm.models.model_arg import spec_from_model_arg
from densevlm.models.dense_clip import LAST_BLOCKS

log = logging.getLogger(__name__)

PYRAMID = ("res2", "res3", "res4", "res5")
CLIP_MAP = "clip"


def default_out_indices(depth: int) -> list[int]:
    """The last block of each quarter of the tower: [3, 5, 7, 11] is F-ViT's choice for 12 blocks, this gives
    [2, 5, 8, 11]; F-ViT's own lists are one config line away (OUT_INDICES)."""
    return [max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)]


class DenseVLMBackbone(Backbone):
    """``res2``..``res5`` (strides 4/8/16/32, ``width`` channels) and ``clip`` (stride 16, ``embed_dim``)."""

    def __init__(
        self,
        model: DenseCLIP,
        *,
        out_indices: Optional[Sequence[int]] = None,
        frozen: bool = True,
        last_block: str = "value",
        norm: str = "LN",
        token_stride: int = 16,
        square_pad: int = 0,
        out_features: Sequence[str] = (*PYRAMID, CLIP_MAP),
    ) -> None:
        super().__init__()
        self.clip = model
        depth = len(model.visual_blocks())
        indices = list(out_indices) if out_indices else default_out_indices(depth)
        if len(indices) != 4 or not all(-depth <= i < depth for i in indices):
            raise ValueError(f"MODEL.DENSEVLM.OUT_INDICES: expected 4 block indices in [0, {depth}), got {indices}")
        if last_block not in LAST_BLOCKS:
            raise ValueError(f"MODEL.DENSEVLM.LAST_BLOCK: expected one of {list(LAST_BLOCKS)}, got {last_block!r}")
        unknown = sorted(set(out_features) - {*PYRAMID, CLIP_MAP})
        if unknown:
            raise ValueError(f"out_features {unknown} unknown; expected a subset of {[*PYRAMID, CLIP_MAP]}")
        if token_stride % 4 or token_stride < 8:
            raise ValueError(f"MODEL.DENSEVLM.TOKEN_STRIDE: expected a multiple of 4, at least 8, got {token_stride}")
        self.out_indices = indices
        self.frozen = frozen
        self.last_block = last_block
        self.token_stride = int(token_stride)
        self.square_pad = int(square_pad)
        if frozen:
            for p in self.clip.parameters():
                p.requires_grad_(False)
            self.clip.eval()
        width = model.width
        self.to_stride4 = nn.Sequential(
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
            get_norm(norm, width) or nn.Identity(),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, kernel_size=2, stride=2),
        )
        self.to_stride8 = nn.ConvTranspose2d(width, width, kernel_size=2, stride=2)
        self.to_stride32 = nn.MaxPool2d(kernel_size=2, stride=2)
        s = self.token_stride
        self._out_features = list(out_features)
        self._out_feature_strides = {"res2": s // 4, "res3": s // 2, "res4": s, "res5": 2 * s, CLIP_MAP: s}
        self._out_feature_channels = {**{k: width for k in PYRAMID}, CLIP_MAP: model.embed_dim}
        #: the ``clip`` map of the last forward (read by :class:`DenseVLMFPN`, whose outputs are the FPN's)
        self.last_clip_map: Optional[torch.Tensor] = None

    @property
    def size_divisibility(self) -> int:
        return 2 * self.token_stride  # res5 halves the token grid

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": self.square_pad}

    def train(self, mode: bool = True) -> "DenseVLMBackbone":
        super().train(mode)
        if self.frozen:
            self.clip.eval()  # a frozen CLIP stays in eval mode (no dropout / drop path), as F-ViT keeps it
        return self

    def _tower_input(self, images: torch.Tensor) -> torch.Tensor:
        """Rescale so one token covers ``token_stride`` input pixels (a no-op when it equals the patch size)."""
        h, w = images.shape[-2:]
        if h % self.token_stride or w % self.token_stride:
            raise ValueError(f"input {h}x{w} is not divisible by TOKEN_STRIDE {self.token_stride}; set "
                             f"INPUT/size_divisibility to {self.size_divisibility} (the backbone's size_divisibility)")
        patch = self.clip.patch_size
        if patch == self.token_stride:
            return images
        size = (h // self.token_stride * patch, w // self.token_stride * patch)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        grad = contextlib.nullcontext() if not self.frozen else torch.no_grad()
        with grad:
            maps, dense = self.clip.encode_dense_with_intermediates(
                self._tower_input(images), self.out_indices, last_block=self.last_block)
        self.last_clip_map = dense
        outputs = {
            "res2": self.to_stride4(maps[0]),
            "res3": self.to_stride8(maps[1]),
            "res4": maps[2],
            "res5": self.to_stride32(maps[3]),
            CLIP_MAP: dense,
        }
        return {k: outputs[k] for k in self._out_features}


class DenseVLMFPN(FPN):
    """detectron2's FPN over ``res2``..``res5`` (``p2``..``p6``), passing the bottom-up ``clip`` map through."""

    def output_shape(self) -> dict[str, ShapeSpec]:
        # FPN's own _out_features must stay p2..p6 (its forward zips them with its results)
        return {**super().output_shape(), CLIP_MAP: self.bottom_up.output_shape()[CLIP_MAP]}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = super().forward(x)  # runs the bottom-up once; it keeps its clip map for us
        outputs[CLIP_MAP] = self.bottom_up.last_clip_map
        return outputs


def _check_pixel_stats(cfg, model: DenseCLIP) -> None:
    mean = [round(v * 255, 4) for v in model.image_mean]
    std = [round(v * 255, 4) for v in model.image_std]
    ok = (cfg.INPUT.FORMAT == "RGB" and all(abs(a - b) < 1e-2 for a, b in zip(cfg.MODEL.PIXEL_MEAN, mean))
          and all(abs(a - b) < 1e-2 for a, b in zip(cfg.MODEL.PIXEL_STD, std)))
    if not ok:
        log.warning("%s was trained on RGB inputs normalised with mean %s, std %s (x255); the config has "
                    "INPUT.FORMAT=%s, MODEL.PIXEL_MEAN=%s, MODEL.PIXEL_STD=%s (F-ViT's ImageNet statistics are a "
                    "choice, not a mistake; check it is yours)", model.name, mean, std, cfg.INPUT.FORMAT,
                    list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD))


@BACKBONE_REGISTRY.register()
def build_densevlm_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> DenseVLMBackbone:
    """``MODEL.BACKBONE.NAME: build_densevlm_backbone``: the pyramid ``res2``..``res5`` and ``clip``."""
    d = cfg.MODEL.DENSEVLM
    if input_shape is not None and input_shape.channels not in (None, 3):
        raise ValueError(f"the densevlm backbone takes 3-channel images, input_shape has {input_shape.channels}")
    model = create_backbone(spec_from_model_arg(d.MODEL, d.NAME or None))
    _check_pixel_stats(cfg, model)
    return DenseVLMBackbone(
        model, out_indices=list(d.OUT_INDICES), frozen=d.FROZEN, last_block=d.LAST_BLOCK, norm=d.NORM,
        token_stride=d.TOKEN_STRIDE, square_pad=d.SQUARE_PAD,
    )


@BACKBONE_REGISTRY.register()
def build_densevlm_fpn_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> DenseVLMFPN:
    """``MODEL.BACKBONE.NAME: build_densevlm_fpn_backbone``: FPN ``p2``..``p6`` (``MODEL.FPN.*``) and ``clip``."""
    bottom_up = build_densevlm_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES) or list(PYRAMID)
    return DenseVLMFPN(
        bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        square_pad=cfg.MODEL.DENSEVLM.SQUARE_PAD,
    )
