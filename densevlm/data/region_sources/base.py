"""The region-source interface and registry: what a source gives per image, and how regions reach the canvas.

A region source names the regions of every image of an :class:`~densevlm.data.sources.ImageSource`: boxes in
original-image pixels (``[x0, y0, x1, y1]``, pixel edges), optionally a full-resolution mask per region, a score
and an id. Each region of an image has a *slot*: its position in the image's region list (for the grid, the
global cell index of :func:`~densevlm.data.grid_boxes.cell_offsets`). ``(image key, slot)`` names a region for the
teacher cache, the proposed labels and their corrections; the source's :meth:`RegionSource.identity` says which
list the slots index into.

:func:`regions_on_canvas` maps regions onto the padded training canvas with the evaluation's geometry
(:func:`~densevlm.data.transforms.resized_size`; masks area-averaged onto the token grid with
:func:`~densevlm.data.panoptic.token_grid_weights`), so a region trains exactly where it is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch

from densevlm.config.core import ConfigError
from densevlm.config.regions import RegionSourceConfig
from densevlm.data.panoptic import token_grid_weights
from densevlm.data.sources import ImageSource
from densevlm.data.teacher_cache import image_keys
from densevlm.data.transforms import resized_size
from densevlm.utils.io import read_json


class RegionSourceError(ValueError):
    """A region file that does not fit its images (unknown image, box outside the image, empty mask); the message
    names the file and the region."""


@dataclass
class ImageRegions:
    """The regions of one image, in slot order.

    ``boxes`` (K, 4) float64 original-image pixels ``[x0, y0, x1, y1]``; ``slots`` (K,) their slots; ``ids`` the
    file's ids (annotation ids, for messages and exports); ``scores`` (K,); ``masks`` None for box regions, else a
    function giving the (K, H, W) bool masks at the image's resolution (decoded only when asked); ``to_canvas``
    maps pixel boxes onto the canvas (``(boxes, width, height, size) -> (K, 4)``; the grid keeps its own
    arithmetic, so a labelled cell is bit for bit the cell training draws and the teacher cache stores).
    """

    boxes: np.ndarray
    slots: list[int]
    ids: list[Any]
    scores: np.ndarray
    masks: Optional[Callable[[], np.ndarray]] = None
    categories: list[Any] = field(default_factory=list)
    to_canvas: Optional[Callable[[np.ndarray, int, int, int], torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.slots)


class RegionSource(Protocol):
    """Regions of every image of an image source (see the module docstring)."""

    #: "boxes" (RoIAlign over the box) or "masks" (masked mean over the mask)
    pooling: str

    def identity(self) -> dict[str, Any]:
        """What the regions depend on (the teacher cache and corrections files are keyed by it)."""
        ...

    def regions(self, index: int, width: int, height: int) -> ImageRegions:
        """The regions of image ``index`` of the image source, whose size is ``width`` x ``height``."""
        ...


@dataclass(frozen=True)
class GridSpec:
    """The grid's settings (``data.grid_style`` resolved for the method, ``data.max_split``)."""

    style: str = "densevlm"
    max_split: int = 6


SourceBuilder = Callable[[RegionSourceConfig, ImageSource, GridSpec], RegionSource]
IdentityFn = Callable[[RegionSourceConfig, GridSpec], dict[str, Any]]

#: kind (``data.regions.kind``) -> ``build(cfg, image_source, grid) -> RegionSource``
REGION_SOURCES: dict[str, SourceBuilder] = {}
#: kind -> ``identity(cfg, grid)`` without reading the region file's contents (the cache metadata needs it)
REGION_IDENTITIES: dict[str, IdentityFn] = {}


def register_region_source(kind: str, identity: IdentityFn) -> Callable[[SourceBuilder], SourceBuilder]:
    """Register a region source's builder under ``kind`` with the function computing its identity."""
    def register(build: SourceBuilder) -> SourceBuilder:
        if kind in REGION_SOURCES:
            raise ValueError(f"region source {kind!r} is registered twice")
        REGION_SOURCES[kind] = build
        REGION_IDENTITIES[kind] = identity
        return build
    return register


def _known(cfg: RegionSourceConfig) -> None:
    if cfg.kind not in REGION_SOURCES:
        raise ConfigError(f"data.regions.kind: expected one of {sorted(REGION_SOURCES)}, got {cfg.kind!r}")


def build_region_source(cfg: RegionSourceConfig, images: ImageSource, grid: GridSpec = GridSpec()) -> RegionSource:
    """The region source of ``cfg`` over ``images`` (``grid``: the grid's settings, for ``grid``)."""
    _known(cfg)
    return REGION_SOURCES[cfg.kind](cfg, images, grid)


def region_identity(cfg: RegionSourceConfig, grid: GridSpec = GridSpec()) -> dict[str, Any]:
    """The identity of ``cfg``'s regions (kind, file and its sha256, selection), without loading the file."""
    _known(cfg)
    return REGION_IDENTITIES[cfg.kind](cfg, grid)


def describe_identity(identity: dict[str, Any]) -> str:
    """One line naming a region source, for messages (``boxes:/data/props.json (sha256 3fa2..., top_k 20)``)."""
    if identity.get("kind") == "grid":
        return f"grid ({identity.get('grid_style')}, max_split {identity.get('max_split')})"
    extra = ", ".join(f"{k} {identity[k]}" for k in ("top_k", "min_score") if identity.get(k))
    sha = str(identity.get("sha256", ""))[:12]
    return f"{identity.get('kind')}:{identity.get('path')} (sha256 {sha}{', ' + extra if extra else ''})"


# --------------------------------------------------------------------------------------------- images
@dataclass
class SourceImages:
    """How a region file names the images of an image source.

    ``keys``: each image's name relative to the source's image root (the teacher cache's image keys); ``ids``:
    image id -> index from the source's COCO json (a folder source has none); ``all_names`` / ``all_ids``: every
    image the source has before ``max_images`` cuts it, so that a region of an image left out is skipped while a
    region of an image the source does not have at all is an error.
    """

    keys: list[str]
    ids: dict[Any, int]
    all_names: set[str]
    all_ids: set[Any]
    root: Optional[Path] = None

    def has_name(self, name: str) -> bool:
        if name in self.all_names:
            return True
        return self.root is not None and (self.root / name).is_file()


def source_images(images: ImageSource) -> SourceImages:
    """The :class:`SourceImages` of ``images``."""
    keys = image_keys(images)
    cfg = images.cfg
    json_path = {"coco_json": cfg.path,
                 "toyworld": str(Path(cfg.path) / "annotations" / f"captions_{cfg.split}.json")}.get(cfg.kind)
    ids: dict[Any, int] = {}
    all_names, all_ids = set(keys), set()
    if json_path:
        by_name = {k: i for i, k in enumerate(keys)}
        for img in read_json(json_path, "COCO json").get("images", []):
            name = str(img.get("file_name"))
            all_names.add(name)
            all_ids.add(img.get("id"))
            if name in by_name:
                ids[img["id"]] = by_name[name]
    root = Path(cfg.path) if cfg.kind == "folder" else None
    return SourceImages(keys, ids, all_names, all_ids, root)


def select(scores: np.ndarray, top_k: int, min_score: float) -> np.ndarray:
    """Indices of the kept regions, best score first (file order among equal scores)."""
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= min_score]
    return order[:top_k] if top_k else order


# --------------------------------------------------------------------------------------------- canvas
def boxes_on_canvas(boxes: np.ndarray, width: int, height: int, size: int) -> torch.Tensor:
    """(K, 4) original-pixel boxes -> normalised ``[x0, y0, x1, y1]`` on the ``size`` canvas, exactly as the
    evaluation maps its boxes (:class:`~densevlm.data.panoptic.PanopticRegionDataset`)."""
    new_w, new_h = resized_size(width, height, size)
    sx, sy = new_w / width, new_h / height
    out = [[x0 * sx / size, y0 * sy / size, x1 * sx / size, y1 * sy / size] for x0, y0, x1, y1 in boxes.tolist()]
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def masks_on_grid(masks: np.ndarray, width: int, height: int, size: int, patch: int) -> torch.Tensor:
    """(K, H, W) bool masks -> (K, g, g) token-grid weights (g = size // patch), each token the fraction of its
    cell the resized mask covers: the evaluation's :func:`~densevlm.data.panoptic.token_grid_weights`, one mask
    at a time (proposal masks may overlap)."""
    new_w, new_h = resized_size(width, height, size)
    grid = size // patch
    out = np.zeros((len(masks), grid, grid), dtype=np.float32)
    for k, m in enumerate(masks):
        out[k] = token_grid_weights(m.astype(np.int64), [1], (new_h, new_w), grid, patch)[0]
    return torch.from_numpy(out)


def mask_extent(mask: np.ndarray) -> tuple[float, float, float, float]:
    """A mask's box in pixel-edge coordinates (one past the last pixel), as the evaluation's stuff boxes."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def regions_on_canvas(regions: ImageRegions, keep: Sequence[int], width: int, height: int, size: int,
                      patches: Sequence[int] = ()) -> dict[str, Any]:
    """The kept regions (positions ``keep`` of ``regions``) on the canvas: ``boxes`` (k, 4) normalised and, for a
    mask source, ``masks`` {``p<patch>``: (k, g, g)} on the token grid of each patch size in ``patches``."""
    keep = list(keep)
    to_canvas = regions.to_canvas or boxes_on_canvas
    out: dict[str, Any] = {"boxes": to_canvas(regions.boxes[keep], width, height, size)}
    if regions.masks is not None:
        full = regions.masks()[keep] if keep else np.zeros((0, height, width), dtype=bool)
        out["masks"] = {f"p{p}": masks_on_grid(full, width, height, size, p) for p in patches}
    return out
