"""``MODEL.DENSEVLM.*``: the config keys of the densevlm backbone (detectron2's yacs ``CfgNode``)."""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_densevlm_config(cfg: CN) -> CN:
    """Add ``MODEL.DENSEVLM`` with its defaults to ``cfg`` (in place; returns it).

    Keys:
        MODEL: what ``densevlm export --model`` takes: a run directory, a weights file (any layout densevlm reads),
            a local-dir export, or a zoo / open_clip model name (random weights).
        NAME: architecture of a weights file when the file does not say it (open_clip name or model-config JSON).
        OUT_INDICES: 0-based blocks whose tokens feed res2, res3, res4, res5 (F-ViT: [3, 5, 7, 11] for B/16,
            [6, 10, 14, 23] for L/14); empty = the last block of each quarter of the tower.
        FROZEN: freeze the whole CLIP (F-ViT and the DenseVLM evaluation do); the pyramid layers always train.
        LAST_BLOCK: "value" (the DenseVLM/CLIPSelf dense path, F-ViT's forward_without_attn), "standard", or a
            DeCLIP mode ("qq", ...: the decoupled last block a DeCLIP-tuned backbone was trained with).
        NORM: normalisation between the stride-4 transposed convolutions ("LN", "BN", "SyncBN", "GN", "").
        TOKEN_STRIDE: input pixels per token. A ViT with another patch size (14) sees the image rescaled by
            patch / TOKEN_STRIDE, so the pyramid keeps detectron2's integer strides 4/8/16/32.
        SQUARE_PAD: pad inputs to this square size (padding_constraints, as ViTDet); 0 = no square padding.
    """
    cfg.MODEL.DENSEVLM = CN()
    cfg.MODEL.DENSEVLM.MODEL = ""
    cfg.MODEL.DENSEVLM.NAME = ""
    cfg.MODEL.DENSEVLM.OUT_INDICES = []
    cfg.MODEL.DENSEVLM.FROZEN = True
    cfg.MODEL.DENSEVLM.LAST_BLOCK = "value"
    cfg.MODEL.DENSEVLM.NORM = "LN"
    cfg.MODEL.DENSEVLM.TOKEN_STRIDE = 16
    cfg.MODEL.DENSEVLM.SQUARE_PAD = 0
    cfg.MODEL.DENSEVLM.FPN_OUT_CHANNELS = 256
    return cfg
