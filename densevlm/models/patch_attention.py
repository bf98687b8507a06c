"""Talk2DINO's view of a frozen ViT: final-norm patch tokens and the last block's per-head CLS→patch attention.

Talk2DINO (arXiv 2411.19331) reads two things off a frozen vision transformer: the patch tokens after the final
norm (DINOv2's ``x_norm_patchtokens``) and, per head of the last block, the class token's attention logits over
the patch keys (``q_cls · k_p / sqrt(d_head)``, before the softmax; class and register keys dropped). The logits
are recomputed from the block's own q/k projections, so they are exact whatever attention kernel the block runs
(fused SDPA never materialises the attention matrix).

:class:`PatchBackbone` is that view; two implementations share it:

* :class:`DINOv2Backbone`: DINOv2 with registers through timm (``vit_base_patch14_reg4_dinov2``,
  ``vit_large_patch14_reg4_dinov2``), built by :func:`create_dinov2` from a local file in the original DINOv2
  layout (converted by timm's own ``checkpoint_filter_fn`` at the loading boundary), from timm's hub, or random.
* :class:`DenseCLIPPatchBackbone`: the visual tower of any :class:`~densevlm.models.DenseCLIP` of our factory
  (open_clip ViTs, EVA02; tuned or not), so a CLIPSelf/DenseVLM-tuned backbone can serve under Talk2DINO.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.utils.hashing import sha256_file, sha256_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torch.hub names of the reference (``facebookresearch/dinov2``) -> timm names.
DINOV2_ALIASES = {
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
}


@dataclass
class PatchFeatures:
    """What Talk2DINO reads off a backbone for a batch.

    Attributes:
        tokens: (B, N, D) patch tokens after the final norm, row-major over the (h, w) grid.
        attn: (B, heads, N) last-block attention logits of the class-token query over the patch keys.
        grid: (h, w) patch grid, h * w = N.
    """

    tokens: torch.Tensor
    attn: torch.Tensor
    grid: tuple[int, int]


def cls_patch_logits(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int) -> torch.Tensor:
    """(B, heads, T, d) queries and keys -> (B, heads, N) logits of query 0 (CLS) over the keys after the prefix."""
    return torch.einsum("bhd,bhnd->bhn", q[:, :, 0] * scale, k[:, :, num_prefix:])


class PatchBackbone(nn.Module, metaclass=ABCMeta):
    """A frozen ViT seen as Talk2DINO sees it; ``forward(images) -> PatchFeatures``.

    Attributes:
        name: architecture name; ``weights_id``: short hash of the weights (feature caches are keyed on both).
        embed_dim: D of the patch tokens; ``num_heads``: heads of the last block; ``patch_size``: pixels.
        image_mean, image_std: the input normalisation the backbone expects.
    """

    name: str
    embed_dim: int
    num_heads: int
    patch_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    @abstractmethod
    def weights_id(self) -> str:
        """Short stable id of the loaded weights."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> PatchFeatures:
        """(B, 3, H, W) normalised images (H, W multiples of the patch size) -> :class:`PatchFeatures`."""

    def identity(self) -> dict[str, Any]:
        """What a feature cache records to recognise these features (name, weights, kind, sizes)."""
        return {"name": self.name, "weights_id": self.weights_id, "kind": type(self).__name__,
                "embed_dim": self.embed_dim, "num_heads": self.num_heads, "patch_size": self.patch_size}


# ---------------------------------------------------------------------------------------------- DINOv2 (timm)


class DINOv2Backbone(PatchBackbone):
    """A timm ``VisionTransformer`` (DINOv2 with registers, or any timm ViT with a fused ``qkv``).

    The last block's ``attn.qkv`` output is captured by a forward hook during ``forward_features`` (whose output
    is the final-norm token sequence [CLS, registers, patches]); q and k get the block's q/k norms, as its
    attention does, then :func:`cls_patch_logits`.
    """

    def __init__(self, model: nn.Module, *, name: str, source: str = "random init",
                 weights_sha256: Optional[str] = None) -> None:
        super().__init__()
        attn = getattr(model.blocks[-1], "attn", None)
        if not isinstance(getattr(attn, "qkv", None), nn.Linear):
            raise TypeError(f"{name}: the last block's attention has no fused 'qkv' projection; cannot recompute "
                            "its attention")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.source = source
        self._sha = weights_sha256
        self.embed_dim = int(model.embed_dim)
        self.num_heads = int(attn.num_heads)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.image_mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.image_std = tuple(cfg.get("std", IMAGENET_STD))

    @property
    def weights_id(self) -> str:
        if self._sha is None:
            self._sha = sha256_state_dict(self.model.state_dict())
        return self._sha[:16]

    def forward(self, images: torch.Tensor) -> PatchFeatures:
        attn = self.model.blocks[-1].attn
        captured: list[torch.Tensor] = []
        handle = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.model.forward_features(images.to(self.model.patch_embed.proj.weight))
        finally:
            handle.remove()
        b, t, _ = out.shape
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        q, k, _ = captured[0].reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = cls_patch_logits(q.float(), k.float(), float(attn.scale), self.num_prefix_tokens)
        return PatchFeatures(out[:, self.num_prefix_tokens:].float(), logits, (h, w))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # wrappers of training checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()
            if isinstance(v, torch.Tensor)}


def _adopt_file_grid(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a per-input-resizing model the file's square position grid before the converter sees the file.

    DINOv2 resizes its stored table once, to each input's grid. timm's converter would first resample the table to
    the model's own grid (37x37 at timm's 518 px), and the run-time resize of that resampled table moves the tokens
    (by 0.8 max abs on the tiny fixture of tests/fixtures, whose grid is 7x7).
    """
    pos = state.get("pos_embed")
    if pos is None or not getattr(model, "dynamic_img_size", False):
        return
    # the original layout keeps the class token's row in the table; timm's DINOv2-reg layout does not
    prefix = 1 if "mask_token" in state else (0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens)
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side == pos.shape[1] - prefix and tuple(model.patch_embed.grid_size) != (side, side):
        model.set_input_size(img_size=side * model.patch_embed.patch_size[0])


def load_dinov2_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load a local DINOv2 file (original ``dinov2_vit*14_reg4_pretrain.pth`` layout, or timm's) into ``model``.

    The original layout is converted by timm's ``checkpoint_filter_fn`` (registers out of the position embedding,
    the class token's position folded in). A model that resizes its position embedding per input (timm's
    ``dynamic_img_size``, as :func:`create_dinov2` builds it) takes the file's grid, as DINOv2 does. Shape
    mismatches (a ViT-L file for a ViT-B model, ...) and missing or unexpected keys raise a ValueError naming the
    file, the keys and shapes.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 weights not found: {path}")
    state = _read_state_dict(path)
    _adopt_file_grid(model, state)
    expected = model.state_dict()
    # Compare a few size-defining shapes before the converter runs: it would try to resample a foreign grid first.
    for key in ("cls_token", "patch_embed.proj.weight"):
        if key in state and key in expected and state[key].shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {list(state[key].shape)}, model {name} expects "
                             f"{list(expected[key].shape)} (a checkpoint of another size?)")
    converted = checkpoint_filter_fn(state, model)
    wrong = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
             for k, v in converted.items() if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if wrong or missing or unexpected:
        depth = sum(1 for k in expected if k.endswith("attn.qkv.weight"))
        file_depth = sum(1 for k in converted if k.endswith("attn.qkv.weight"))
        parts = [f"{path} does not fit {name} (depth {depth}, width {getattr(model, 'embed_dim', '?')}; the file "
                 f"has {file_depth} blocks)"]
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. " + "; ".join(wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ValueError(": ".join(parts[:1]) + ": " + "; ".join(parts[1:]))
    model.load_state_dict(converted, strict=True)


def create_dinov2(name: str = "vit_base_patch14_reg4_dinov2", pretrained: Optional[str] = None, *,
                  timm_kwargs: Optional[dict[str, Any]] = None) -> DINOv2Backbone:
    """DINOv2 (with registers) through timm, as a :class:`DINOv2Backbone` in eval mode with frozen weights.

    Args:
        name: a timm name (``vit_base_patch14_reg4_dinov2``, ``vit_large_patch14_reg4_dinov2``) or the reference
            torch.hub name (``dinov2_vitb14_reg``, ``dinov2_vitl14_reg``).
        pretrained: None or "" for random init (tests); a local weights file (original DINOv2 layout or timm's,
            ``.pth`` or ``.safetensors``); "timm" for timm's hub weights (online users).
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth``/``embed_dim``/``num_heads`` of a small
            test model).

    The model takes any input size (``dynamic_img_size``; 448 px gives a 32x32 grid, the recipe's).
    """
    import timm

    timm_name = DINOV2_ALIASES.get(name, name)
    if timm_name not in timm.list_models():
        raise ValueError(f"DINOv2 backbone '{name}': not a timm model; expected one of "
                         f"{sorted(set(DINOV2_ALIASES.values()))} or {sorted(DINOV2_ALIASES)}")
    online = pretrained == "timm"
    model = timm.create_model(timm_name, pretrained=online, num_classes=0, dynamic_img_size=True,
                              **(timm_kwargs or {}))
    source, sha = "random init", None
    if online:
        source = f"timm:{timm_name}"
    elif pretrained:
        load_dinov2_weights(model, pretrained, timm_name)
        source, sha = str(pretrained), sha256_file(pretrained)
    return DINOv2Backbone(model, name=timm_name, source=source, weights_sha256=sha)


# ---------------------------------------------------------------------------------------------- DenseCLIP towers


class DenseCLIPPatchBackbone(PatchBackbone):
    """The visual tower of a :class:`~densevlm.models.DenseCLIP` (open_clip ViT or EVA02), frozen.

    The tokens are the last block's output (``last_block="standard"``, the ViT as it is, as DINOv2's tokens) or
    its value path (``"value"``, the MaskCLIP/CLIPSelf dense path), after the tower's final norm and before the
    projection to the CLIP space (Talk2DINO maps text into the backbone's own token space). The attention logits
    are those of the last block either way.
    """

    def __init__(self, model: Any, last_block: Literal["standard", "value"] = "standard") -> None:
        super().__init__()
        if last_block not in ("standard", "value"):
            raise ValueError(f"last_block: expected 'standard' or 'value', got {last_block!r}")
        self.model = model.eval().requires_grad_(False)
        self.last_block = last_block
        self.name = model.name
        self.family = model.family
        self.patch_size = int(model.patch_size)
        self.embed_dim = int(model.width)
        self.num_heads = int(self._heads(model.visual_blocks()[-1]))
        self.image_mean, self.image_std = tuple(model.image_mean), tuple(model.image_std)

    def _heads(self, block: nn.Module) -> int:
        if self.family == "openclip_vit":
            from open_clip.transformer import ResidualAttentionBlock

            if not isinstance(block, ResidualAttentionBlock):
                raise TypeError(f"{self.name}: the last block is a {type(block).__name__}; attention extraction "
                                "supports open_clip's ResidualAttentionBlock")
        elif self.family != "eva":
            raise TypeError(f"{self.name}: family {self.family!r} not supported (open_clip ViT or EVA02)")
        return block.attn.num_heads

    @property
    def weights_id(self) -> str:
        return self.model.weights_id

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "last_block": self.last_block}

    def _qk(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, heads, T, d) q and k of ``block`` for its input ``x``, as its attention computes them; the scale."""
        b, t, _ = x.shape
        attn = block.attn
        if self.family == "openclip_vit":
            qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
            q, k, _ = qkv.reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            return q, k, q.shape[-1] ** -0.5
        h = block.norm1(x)  # EVA02: q/k fused or split, separate biases, RoPE on the patch tokens
        if attn.qkv is not None:
            bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = F.linear(h, attn.qkv.weight, bias)
            q, k, _ = qkv.reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q = attn.q_proj(h).reshape(b, t, self.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(h).reshape(b, t, self.num_heads, -1).transpose(1, 2)
        q = getattr(attn, "q_norm", nn.Identity())(q)
        k = getattr(attn, "k_norm", nn.Identity())(k)
        if ctx is not None:
            from timm.layers import apply_rot_embed_cat

            npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], ctx, half=half)], dim=2).type_as(q)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], ctx, half=half)], dim=2).type_as(k)
        return q, k, float(attn.scale)

    def _final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.family == "openclip_vit":
            return self.model.clip.visual.ln_post(tokens)
        return self.model.clip.visual.trunk.norm(tokens)

    def forward(self, images: torch.Tensor) -> PatchFeatures:
        m = self.model
        x, grid, ctx = m._embed(m._prepare(images))
        blocks = m.visual_blocks()
        for block in blocks[:-1]:
            x = m._block(block, x, ctx)
        q, k, scale = self._qk(blocks[-1], x, ctx)
        npt = m.num_prefix_tokens
        logits = cls_patch_logits(q.float(), k.float(), scale, npt)
        x = (m._block if self.last_block == "standard" else m._block_value_path)(blocks[-1], x, ctx)
        return PatchFeatures(self._final_norm(x[:, npt:]).float(), logits, grid)


def attention_pool(features: PatchFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Talk2DINO's image embeddings: per head, and with the head-averaged logits.

    Returns ``(heads (B, heads, D), avg (B, D))``: each head's softmax over the patches weights the patch tokens
    (a weighted mean; the reference's extra 1/N only rescales, which cosine similarity removes).
    """
    weights = features.attn.softmax(dim=-1)
    heads = torch.einsum("bhn,bnd->bhd", weights, features.tokens)
    avg = torch.einsum("bn,bnd->bd", features.attn.mean(dim=1).softmax(dim=-1), features.tokens)
    return heads, avg


def create_patch_backbone(cfg: Any, *, device: str | torch.device = "cpu") -> PatchBackbone:
    """The backbone of a :class:`densevlm.config.talk2dino.Talk2DINOVisionConfig`, frozen, in eval mode."""
    if cfg.family == "dinov2":
        backbone: PatchBackbone = create_dinov2(cfg.name, cfg.pretrained, timm_kwargs=cfg.timm_kwargs)
    elif cfg.family == "clip":
        from densevlm.config.model import ModelSpec
        from densevlm.models.factory import create_backbone

        backbone = DenseCLIPPatchBackbone(create_backbone(ModelSpec(name=cfg.name, pretrained=cfg.pretrained)),
                                          last_block=cfg.last_block)
    else:
        raise ValueError(f"vision.family: expected 'dinov2' or 'clip', got {cfg.family!r}")
    return backbone.to(device).eval()
