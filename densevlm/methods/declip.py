"""DeCLIP (CVPR 2025, arXiv 2505.04410): content from crops, context from a vision foundation model.

The student's last block is decoupled (:mod:`densevlm.models.decoupled`): its output, through the final norm and
projection, is the *content* map; its q / k / v tokens are the *context*. Two losses, as the released
``training/declip.py``:

* content: ``content_weight * (1 - mean cos(RoI feature, teacher crop embedding))`` over the valid grid boxes,
  the RoI features pooled (RoIAlign 1x1) from the content map, the targets the frozen teacher's CLS embeddings of
  the box crops (CLIPSelf's loss);
* context: ``context_weight * mean_rows ||S_vfm[m] - S_student[m]||_2``: per image, the cosine self-similarity of
  the VFM's patch tokens (the VFM's grid) against that of the student's context tokens (resized bilinearly to the
  VFM's grid when the grids differ). Single modes (qq, kk, vv) compare the heads' concatenated tokens; csa
  averages the per-head q·q and k·k similarities, all the q·q, k·k and v·v ones, each head against the VFM (the
  released code compares per head; it broadcasts one image's VFM map over the heads).

The VFM sees the student's input resized so its grid is the student's (the released "proxy image": the student
grid times the VFM patch, ImageNet statistics), or a fixed ``vfm_image_size``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densevlm.methods.base import ObjectiveOutput
from densevlm.methods.regions import per_image_boxes

#: mode -> the context projections it distils (csa / all: the mean of their per-head similarities).
CONTEXT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qq": ("q",), "kk": ("k",), "vv": ("v",), "csa": ("q", "k"), "all": ("q", "k", "v"),
}
#: modes that compare the heads' concatenated tokens (the released single-projection modes).
CONCATENATED_MODES = ("qq", "kk", "vv")


def _resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(..., N, C) row-major tokens on ``grid`` -> (..., size[0] * size[1], C), bilinear (align_corners False)."""
    if tuple(grid) == tuple(size):
        return tokens
    lead, c = tokens.shape[:-2], tokens.shape[-1]
    maps = tokens.reshape(-1, *grid, c).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.permute(0, 2, 3, 1).reshape(*lead, size[0] * size[1], c)


def cosine_self_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """(..., N, C) -> (..., N, N) cosine similarity of every token with every other."""
    unit = F.normalize(tokens.to(torch.promote_types(tokens.dtype, torch.float32)), dim=-1)
    return unit @ unit.transpose(-2, -1)


def student_context_similarity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str,
                               grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The student's context similarity on the VFM grid ``size``.

    Args:
        q, k, v: (B, heads, h * w, d) patch tokens of the decoupled block; grid: (h, w).
        mode: a DeCLIP mode.

    Returns:
        (B, M, M) for qq / kk / vv (heads concatenated per token), (B, heads, M, M) for csa / all.
    """
    if mode not in CONTEXT_PROJECTIONS:
        raise ValueError(f"DeCLIP mode: expected one of {list(CONTEXT_PROJECTIONS)}, got {mode!r}")
    tokens = {"q": q, "k": k, "v": v}
    if mode in CONCATENATED_MODES:
        x = tokens[CONTEXT_PROJECTIONS[mode][0]]
        x = x.permute(0, 2, 1, 3).flatten(2)  # (B, N, heads * d), heads in order, as the released view
        return cosine_self_similarity(_resize_tokens(x, grid, size))
    sims = [cosine_self_similarity(_resize_tokens(tokens[p], grid, size)) for p in CONTEXT_PROJECTIONS[mode]]
    return sum(sims) / len(sims)


def context_loss(student: torch.Tensor, vfm: torch.Tensor) -> torch.Tensor:
    """Mean over rows (and heads) of the L2 distance between similarity rows; ``vfm`` (B, M, M) is broadcast over
    the heads of a (B, heads, M, M) ``student``."""
    if student.ndim == 4:
        vfm = vfm.unsqueeze(1)
    return (vfm - student).norm(p=2, dim=-1).mean()


def content_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine of (K, C) student RoI features and (K, C) teacher crop embeddings (0 with no box)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, target = F.normalize(student.to(dtype), dim=-1), F.normalize(target.to(dtype), dim=-1)
    if not len(student):
        return student.sum() * 0.0
    return 1.0 - (student * target).sum(-1).mean()


def declip_student_features(model: nn.Module, images: torch.Tensor, boxes: list[torch.Tensor],
                            mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(RoI features (sum K_i, C), q, k, v, grid) of the decoupled forward. Run via ``step_model(fn, ...)``."""
    out = model.encode_dense_decoupled(images, mode)
    return model.pool_boxes(out.dense, boxes), out.q, out.k, out.v, tuple(out.grid)


def vfm_grid_for(student_grid: tuple[int, int], vfm_patch: int, vfm_image_size: int = 0) -> tuple[int, int]:
    """The VFM's patch grid: the student's (released proxy image), or ``vfm_image_size // vfm_patch`` squared."""
    if vfm_image_size <= 0:
        return tuple(student_grid)
    return vfm_image_size // vfm_patch, vfm_image_size // vfm_patch


def check_grids(student_name: str, student_grid: Sequence[int], vfm_name: str, vfm_grid: Sequence[int],
                vfm_patch: int, vfm_image_size: int = 0) -> None:
    """Raise ValueError when the VFM's patch grid cannot be matched to the student's (named, both grids)."""
    hs, ws = student_grid
    hv, wv = vfm_grid
    if vfm_image_size > 0 and vfm_image_size % vfm_patch:
        raise ValueError(f"VFM {vfm_name!r}: declip.vfm_image_size {vfm_image_size} is not a multiple of its "
                         f"{vfm_patch}-px patch, so its patch grid ({vfm_image_size / vfm_patch:.2f} x "
                         f"{vfm_image_size / vfm_patch:.2f}) cannot be matched to the student {student_name!r} "
                         f"grid ({hs}, {ws})")
    if hv < 1 or wv < 1 or hs * wv != ws * hv:
        raise ValueError(f"VFM {vfm_name!r} patch grid ({hv}, {wv}) cannot be matched to the student "
                         f"{student_name!r} grid ({hs}, {ws}): resizing one to the other would change the aspect "
                         "ratio (set declip.vfm_image_size: 0 to give the VFM the student's grid)")


class DeCLIPObjective:
    """See the module docstring. Batches carry ``crops`` (the dataset builds them, as for CLIPSelf).

    Args:
        teacher: the frozen CLIP whose crop embeddings are the content targets.
        vfm: the frozen :class:`~densevlm.models.patch_attention.PatchBackbone` (DINOv2, or a toy CLIP tower).
        mode: the DeCLIP mode (the student's ``dense_last_block``).
        content_weight, context_weight: the two loss weights.
        student_mean, student_std: the normalisation of the student's images (undone for the VFM's proxy image).
        vfm_image_size: 0 = the student's grid times the VFM patch (released), else a fixed square size.
        student_name: named in grid errors.
    """

    def __init__(self, teacher: nn.Module, vfm: nn.Module, *, mode: str, content_weight: float,
                 context_weight: float, student_mean: Sequence[float], student_std: Sequence[float],
                 vfm_image_size: int = 0, student_name: str = "student") -> None:
        if mode not in CONTEXT_PROJECTIONS:
            raise ValueError(f"DeCLIP mode: expected one of {list(CONTEXT_PROJECTIONS)}, got {mode!r}")
        self.teacher, self.vfm, self.mode = teacher, vfm, mode
        self.content_weight, self.context_weight = float(content_weight), float(context_weight)
        self.vfm_image_size = int(vfm_image_size)
        self.student_name = student_name
        self._student_stats = (torch.tensor(student_mean).view(1, 3, 1, 1), torch.tensor(student_std).view(1, 3, 1, 1))
        self._vfm_stats = (torch.tensor(vfm.image_mean).view(1, 3, 1, 1), torch.tensor(vfm.image_std).view(1, 3, 1, 1))

    def prepare(self, device: torch.device) -> None:
        self.teacher.to(device).eval().requires_grad_(False)
        self.vfm.to(device).eval().requires_grad_(False)

    def proxy_images(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The student's input as the VFM expects it: un-normalised, resized to its grid, VFM statistics."""
        hv, wv = vfm_grid_for(grid, self.vfm.patch_size, self.vfm_image_size)
        check_grids(self.student_name, grid, self.vfm.name, (hv, wv), self.vfm.patch_size, self.vfm_image_size)
        mean, std = (t.to(images.device) for t in self._student_stats)
        vmean, vstd = (t.to(images.device) for t in self._vfm_stats)
        pixels = images.float() * std + mean
        pixels = F.interpolate(pixels, size=(hv * self.vfm.patch_size, wv * self.vfm.patch_size),
                               mode="bilinear", align_corners=False)
        return (pixels - vmean) / vstd

    def vfm_similarity(self, images: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, M, M) cosine self-similarity of the VFM's patch tokens on the proxy images, and the VFM grid."""
        features = self.vfm(self.proxy_images(images, grid))
        return cosine_self_similarity(features.tokens), tuple(features.grid)

    def __call__(self, step_model: nn.Module, batch: dict[str, Any]) -> ObjectiveOutput:
        if "crops" not in batch:
            raise KeyError("DeCLIP needs box crops in the batch; build the dataset with crop_size set")
        images, valid = batch["image"], batch["valid"]
        boxes = per_image_boxes(batch["boxes"], valid)
        rois, q, k, v, grid = step_model(declip_student_features, images, boxes, self.mode)
        with torch.no_grad():
            target = self.teacher.encode_image(batch["crops"][valid])
            vfm_sim, vfm_grid = self.vfm_similarity(images, grid)
        loss_context = context_loss(student_context_similarity(q, k, v, self.mode, grid, vfm_grid), vfm_sim)
        loss_content = content_loss(rois, target)
        loss = self.content_weight * loss_content + self.context_weight * loss_context
        return ObjectiveOutput(loss, {
            "cosine": 1.0 - float(loss_content.detach()) if len(rois) else 0.0,
            "loss_content": float(loss_content.detach()), "loss_context": float(loss_context.detach()),
        })
