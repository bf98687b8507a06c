"""DenseCLIP: one API over open_clip CLIP models for global, text and dense (per-token) features.

A ``DenseCLIP`` owns an open_clip model (``CLIP`` or ``CustomTextCLIP``) as ``self.clip`` and adds the dense
path DenseVLM/CLIPSelf align: the vision tower at any input size, the last block run without q·k attention
(value path only, the MaskCLIP trick), the final norm and projection applied to every patch token, and per-token
L2 normalisation. The family-specific pieces (how tokens are embedded, how a block runs, how tokens are
projected) live in one subclass per family: :mod:`densevlm.models.openclip_vit` and :mod:`densevlm.models.eva`.

``self.clip`` keeps the open_clip layout, so ``state_dict_for_export()`` is a plain open_clip state dict.
"""

from __future__ import annotations

import copy
from abc import ABCMeta, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.models.checkpoints import save_weights
from densevlm.utils.hashing import sha256_state_dict
from densevlm.models.decoupled import DECOUPLED_MODES
from densevlm.models.pooling import BoxesArg, MasksArg, pool_boxes, pool_masks
from densevlm.models.positional import resize_abs_pos_embed

#: "value" (the reference dense path), "standard" (the block as it is) or one of DeCLIP's decoupled modes.
LastBlock = Literal["value", "standard", "qq", "kk", "vv", "csa", "all"]
LAST_BLOCKS: tuple[str, ...] = ("value", "standard", *DECOUPLED_MODES)
_CACHE_SIZE = 8  # grid sizes kept per table kind; training uses one size, evaluation a few


@dataclass
class DecoupledDense:
    """What :meth:`DenseCLIP.encode_dense_decoupled` returns.

    Attributes:
        dense: (B, embed_dim, h, w) per-token L2-normalised map of the decoupled block (DeCLIP's content).
        q, k, v: (B, heads, h * w, head_dim) the last block's patch-token projections (DeCLIP's context), row-major.
        grid: (h, w).
    """

    dense: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grid: tuple[int, int]


class DenseCLIP(nn.Module, metaclass=ABCMeta):
    """Base class; build instances with :func:`densevlm.models.create_backbone`.

    Attributes:
        clip: the wrapped open_clip model.
        name: open_clip model name.
        tokenizer: the open_clip tokenizer for the model (context length from its config).
        image_mean, image_std: per-channel normalisation the model expects (from its preprocess config).
        embed_dim: dimension of the joint image-text space.
        patch_size: side of a (square) patch in pixels.
        native_image_size: side of the (square) training resolution in pixels.
        dense_last_block: default for :meth:`encode_dense`, "value" (reference), "standard" or a DeCLIP mode.
        source: where the weights came from ("random init", a file path or an open_clip tag).
        load_info: details of the load (layout detected, file format, checkpoint extras).
        model_cfg: the open_clip model config the model was built from (overrides and QuickGELU applied).
        preprocess_cfg: open_clip's preprocessing config for the model (size, mean, std, interpolation, ...).
    """

    family: str = ""
    num_prefix_tokens: int = 1

    def __init__(
        self,
        clip: nn.Module,
        *,
        name: str,
        tokenizer: Callable[..., torch.Tensor],
        image_mean: Sequence[float],
        image_std: Sequence[float],
        embed_dim: int,
        dense_last_block: LastBlock = "value",
        source: str = "random init",
        weights_sha256: Optional[str] = None,
        load_info: Optional[dict[str, Any]] = None,
        model_cfg: Optional[dict[str, Any]] = None,
        preprocess_cfg: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if dense_last_block not in LAST_BLOCKS:
            raise ValueError(f"dense_last_block: expected one of {list(LAST_BLOCKS)}, got {dense_last_block!r}")
        self.clip = clip
        self.name = name
        self.tokenizer = tokenizer
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.embed_dim = int(embed_dim)
        self.dense_last_block: LastBlock = dense_last_block
        self.source = source
        self.load_info = dict(load_info or {})
        self.model_cfg = copy.deepcopy(model_cfg) if model_cfg is not None else {}
        self.preprocess_cfg = dict(preprocess_cfg or {})
        self._weights_sha256 = weights_sha256
        # Plain dict attributes (not buffers): derived tables must not enter the state dict.
        self._pos_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._aux_cache: OrderedDict[tuple, Any] = OrderedDict()
        self._check_supported()
        if dense_last_block in DECOUPLED_MODES:
            self.check_decoupled(dense_last_block)

    # ------------------------------------------------------------------ family hooks

    def _check_supported(self) -> None:
        """Raise TypeError when the wrapped vision tower uses a feature the dense path cannot reproduce."""

    @property
    @abstractmethod
    def patch_size(self) -> int:
        """Side of a (square) patch in pixels."""

    @property
    @abstractmethod
    def native_grid(self) -> tuple[int, int]:
        """Token grid (h, w) of the native resolution, the grid the position embedding was trained for."""

    @abstractmethod
    def visual_blocks(self) -> list[nn.Module]:
        """The vision transformer blocks, first to last."""

    @abstractmethod
    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], Any]:
        """Images -> (tokens with prefix, (h, w) grid, per-forward context handed to every block)."""

    @abstractmethod
    def _block(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """One block run normally."""

    @abstractmethod
    def _block_value_path(self, block: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """The block with attention replaced by its value path: x + out(v(norm1(x))), then the MLP residual."""

    @abstractmethod
    def _block_decoupled(self, block: nn.Module, x: torch.Tensor, ctx: Any,
                         mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeCLIP's decoupled block: (output tokens, q, k, v), q/k/v as (B, heads, T, head_dim) with the prefix.

        The output has no residual and no MLP (the released ``forward_without_rcffn`` / ``ss_attn``)."""

    def decoupled_modes(self) -> tuple[str, ...]:
        """The DeCLIP modes this model's last block can run (every mode for the ViT families we build)."""
        return DECOUPLED_MODES

    @abstractmethod
    def _project_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final tokens (with prefix) -> (B, embed_dim) image embedding."""

    @abstractmethod
    def _project_dense(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Final patch tokens (B, N, width) -> (B, N, embed_dim): final norm then projection."""

    # ------------------------------------------------------------------ public API

    @property
    def native_image_size(self) -> int:
        return self.native_grid[0] * self.patch_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def weights_id(self) -> str:
        """Short stable id of the loaded weights: sha256 of the weights file, or of the state dict.

        For random or in-memory weights the state-dict hash is computed on first access and kept; it names
        the weights as they were then (call :meth:`refresh_weights_id` after changing them in place).
        """
        if self._weights_sha256 is None:
            self._weights_sha256 = sha256_state_dict(self.clip.state_dict())
        return self._weights_sha256[:16]

    def refresh_weights_id(self) -> str:
        """Recompute :attr:`weights_id` from the current state dict."""
        self._weights_sha256 = sha256_state_dict(self.clip.state_dict())
        return self.weights_id

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (H // p, W // p) for an (H, W) input."""
        return image_size[0] // self.patch_size, image_size[1] // self.patch_size

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, context) token ids -> (N, embed_dim) text embeddings, not normalised."""
        return self.clip.encode_text(tokens.to(self.logit_scale.device), normalize=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images at any size -> (B, embed_dim) image embeddings, not normalised."""
        x, _, ctx = self._embed(self._prepare(images))
        for block in self.visual_blocks():
            x = self._block(block, x, ctx)
        return self._project_image(x)

    def encode_dense(self, images: torch.Tensor, *, last_block: Optional[LastBlock] = None) -> torch.Tensor:
        """(B, 3, H, W) images at any size -> (B, embed_dim, H // p, W // p) per-token L2-normalised map.

        Args:
            images: normalised images; H and W need not be equal nor multiples of the patch size (the
                remainder is dropped, as by the patch convolution).
            last_block: "value" runs the last block without q·k attention (the reference dense path),
                "standard" runs it normally, a DeCLIP mode ("qq", "kk", "vv", "csa", "all") runs the decoupled
                block (:mod:`densevlm.models.decoupled`); default :attr:`dense_last_block`.
        """
        mode = self._last_block_mode(last_block)
        x, (h, w), ctx = self._embed(self._prepare(images))
        blocks = self.visual_blocks()
        for block in blocks[:-1]:
            x = self._block(block, x, ctx)
        x = self._last_block(blocks[-1], x, ctx, mode)
        features = F.normalize(self._project_dense(x[:, self.num_prefix_tokens:]), dim=-1)
        return features.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    def encode_dense_with_intermediates(
        self, images: torch.Tensor, indices: Sequence[int], *, last_block: Optional[LastBlock] = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`encode_dense` plus the patch tokens after the given blocks, from one pass through the tower.

        Args:
            images: as for :meth:`encode_dense`.
            indices: 0-based block indices (any order, ``-1`` = last); the last block's output is taken from the
                path the dense map uses (``last_block``), as F-ViT takes it.
            last_block: as for :meth:`encode_dense`.

        Returns:
            ``([(B, width, H // p, W // p) per index, in the order given], (B, embed_dim, H // p, W // p) dense map)``.
        """
        mode = self._last_block_mode(last_block)
        blocks = self.visual_blocks()
        wanted = [i + len(blocks) if i < 0 else i for i in indices]
        bad = [i for i, w in zip(indices, wanted) if not 0 <= w < len(blocks)]
        if bad:
            raise ValueError(f"block indices {bad} out of range for {len(blocks)} blocks")
        x, (h, w), ctx = self._embed(self._prepare(images))
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(blocks):
            if i < len(blocks) - 1:
                x = self._block(block, x, ctx)
            else:
                x = self._last_block(block, x, ctx, mode)
            if i in wanted:
                taken[i] = x[:, self.num_prefix_tokens:].reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        features = F.normalize(self._project_dense(x[:, self.num_prefix_tokens:]), dim=-1)
        dense = features.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
        return [taken[i].contiguous() for i in wanted], dense

    def encode_dense_decoupled(self, images: torch.Tensor, mode: str) -> DecoupledDense:
        """DeCLIP's forward: the decoupled last block's dense map (content) and its q / k / v tokens (context).

        Args:
            images: as for :meth:`encode_dense`.
            mode: a DeCLIP mode this model supports (:meth:`decoupled_modes`).
        """
        self.check_decoupled(mode)
        x, grid, ctx = self._embed(self._prepare(images))
        blocks = self.visual_blocks()
        for block in blocks[:-1]:
            x = self._block(block, x, ctx)
        x, q, k, v = self._block_decoupled(blocks[-1], x, ctx, mode)
        npt = self.num_prefix_tokens
        features = F.normalize(self._project_dense(x[:, npt:]), dim=-1)
        dense = features.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
        return DecoupledDense(dense, q[:, :, npt:], k[:, :, npt:], v[:, :, npt:], grid)

    def check_decoupled(self, mode: str) -> None:
        """Raise ValueError naming the model and its modes when it cannot run DeCLIP's ``mode``."""
        supported = self.decoupled_modes()
        if mode not in supported:
            raise ValueError(f"model {self.name!r} ({self.family}) cannot decouple its last block in mode {mode!r}; "
                             f"modes it supports: {list(supported) or 'none'}")

    def _last_block_mode(self, last_block: Optional[str]) -> str:
        mode = last_block if last_block is not None else self.dense_last_block
        if mode not in LAST_BLOCKS:
            raise ValueError(f"last_block: expected one of {list(LAST_BLOCKS)}, got {mode!r}")
        if mode in DECOUPLED_MODES:
            self.check_decoupled(mode)
        return mode

    def _last_block(self, block: nn.Module, x: torch.Tensor, ctx: Any, mode: str) -> torch.Tensor:
        """The last block as the dense path runs it in ``mode``."""
        if mode == "value":
            return self._block_value_path(block, x, ctx)
        if mode == "standard":
            return self._block(block, x, ctx)
        return self._block_decoupled(block, x, ctx, mode)[0]

    @property
    def width(self) -> int:
        """Channels of the vision tower's tokens (the intermediate maps of :meth:`encode_dense_with_intermediates`)."""
        return int(self._patch_weight().shape[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The training forward: :meth:`encode_dense` (so a DDP-wrapped model syncs dense-path gradients)."""
        return self.encode_dense(images)

    def pool_boxes(self, dense: torch.Tensor, boxes: BoxesArg) -> torch.Tensor:
        """RoIAlign 1x1 of normalised boxes on a dense map; see :func:`densevlm.models.pooling.pool_boxes`."""
        return pool_boxes(dense, boxes)

    def pool_masks(self, dense: torch.Tensor, masks: MasksArg) -> torch.Tensor:
        """Masked means on a dense map; see :func:`densevlm.models.pooling.pool_masks`."""
        return pool_masks(dense, masks)

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """The weights in open_clip layout (``open_clip.create_model(name, pretrained=file)`` loads them)."""
        return {k: v.detach() for k, v in self.clip.state_dict().items()}

    def save_weights(self, path: str | Path) -> Path:
        """Write :meth:`state_dict_for_export` atomically (``.safetensors`` with the model name, or torch)."""
        return save_weights(self.state_dict_for_export(), path, model_name=self.name)

    # ------------------------------------------------------------------ shared helpers for the families

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check the image batch and move it to the device and dtype of the patch embedding."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
        if images.shape[-2] < self.patch_size or images.shape[-1] < self.patch_size:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} are smaller than one {self.patch_size}-px patch"
            )
        weight = self._patch_weight()
        return images.to(device=weight.device, dtype=weight.dtype)

    @abstractmethod
    def _patch_weight(self) -> torch.Tensor:
        """The patch-embedding weight (its device and dtype are the model's)."""

    @staticmethod
    def _remember(cache: OrderedDict, key: tuple, value: Any) -> Any:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return value

    def _pos_embed_for_grid(self, pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding resized to ``grid`` (reference bicubic), cached per grid size.

        The resize is cached only when no gradient has to reach the parameter (frozen, or no-grad mode);
        a trainable embedding is resized on every call so its gradient is exact. The cache key includes the
        parameter's in-place version counter, so an optimizer step or ``load_state_dict`` invalidates it, and
        inference mode, whose tensors cannot be used in a later autograd-recorded forward.
        """
        if grid == self.native_grid:
            return pos_embed
        needs_grad = torch.is_grad_enabled() and pos_embed.requires_grad
        if needs_grad:
            return resize_abs_pos_embed(pos_embed, self.native_grid, grid, self.num_prefix_tokens)
        key = (grid, pos_embed.data_ptr(), pos_embed._version, pos_embed.device, pos_embed.dtype,
               torch.is_inference_mode_enabled())
        cached = self._pos_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = resize_abs_pos_embed(pos_embed, self.native_grid, grid, self.num_prefix_tokens)
            self._remember(self._pos_cache, key, cached)
        return cached

    def _cached_aux(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """Cache for parameter-free per-grid tables (e.g. RoPE).

        Keyed on inference mode too: a table made under ``torch.inference_mode()`` cannot take part in a
        later autograd-recorded forward.
        """
        key = (*key, torch.is_inference_mode_enabled())
        value = self._aux_cache.get(key)
        if value is None:
            value = self._remember(self._aux_cache, key, compute())
        return value

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, family={self.family!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
            f"native_image_size={self.native_image_size}, dense_last_block={self.dense_last_block!r}"
        )
