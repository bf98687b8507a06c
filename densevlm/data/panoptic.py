"""Ground-truth regions of a COCO-panoptic-format split, prepared for region classification.

Any COCO-panoptic-format split works (COCO panoptic val2017, ADE20K panoptic val, a toy-world split): a json
with ``images``, ``annotations`` (one per image, ``file_name`` of its PNG and ``segments_info``) and
``categories``, plus a folder of PNGs whose pixels encode segment ids as ``R + 256·G + 256²·B`` (0 = void).

Each image is resized (longest side) and zero-padded to a square canvas, as in the reference protocol. Each
kept segment yields

* a box ``[x0, y0, x1, y1]`` normalised to the padded canvas (thing: the json ``bbox``; stuff: the extent of
  its mask, in pixel-edge coordinates, i.e. one past the last pixel);
* its mask on the model's token grid (``image_size // patch_size`` square), each token weighted by the fraction
  of its cell the segment covers on the canvas (exact area averaging of the resized mask, padding included);
* the vocabulary index of its category and its thing flag.

Annotations are checked against the PNG of every image read: a json segment missing from the PNG, a non-void
PNG id missing from the json and a category the vocabulary lacks are errors naming the image and segment; an
``area`` that disagrees with the PNG pixel count is a logged warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from densevlm.config.evaluation import PanopticDataConfig
from densevlm.data.images import ImageReadError, load_rgb
from densevlm.data.transforms import CLIP_MEAN, CLIP_STD, resize_longest_pad, resized_size, to_tensor
from densevlm.utils.io import read_json
from densevlm.vocab.registry import vocabulary_from_categories_file
from densevlm.vocab.vocabulary import Vocabulary, split_synonyms

logger = logging.getLogger(__name__)


class PanopticAnnotationError(ValueError):
    """The panoptic json and a PNG (or the vocabulary) disagree; the message names the image and segment."""


@dataclass(frozen=True)
class _Segment:
    id: int
    category_id: int
    bbox: Optional[tuple[float, float, float, float]]  # json [x, y, w, h]
    area: Optional[int]


@dataclass(frozen=True)
class _ImageRecord:
    image_id: Any
    file_name: str  # relative to image_root
    png_name: str  # relative to the panoptic root
    segments: tuple[_Segment, ...]


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 panoptic PNG -> (H, W) int64 segment ids, ``R + 256·G + 256²·B``."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def load_panoptic_png(path: str | os.PathLike) -> np.ndarray:
    """Read a panoptic PNG into an (H, W) int64 id map, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"panoptic PNG not found: {p}")
    try:
        with Image.open(p) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise ImageReadError(f"cannot read panoptic PNG {p}: {err}") from None
    return rgb_to_id(rgb)


def _overlap_matrix(n_src: int, n_dst: int, cells: int, cell: int) -> np.ndarray:
    """(cells, n_src): canvas length of source pixel ``s`` (resized to ``n_dst`` pixels) inside token ``c``.

    Source pixel ``s`` covers ``[s·f, (s+1)·f)`` on the canvas with ``f = n_dst / n_src``; token ``c`` covers
    ``[c·cell, (c+1)·cell)``. Canvas pixels beyond ``n_dst`` are padding and belong to no source pixel.
    """
    f = n_dst / n_src
    lo = np.arange(n_src, dtype=np.float64) * f
    hi = lo + f
    c_lo = np.arange(cells, dtype=np.float64)[:, None] * cell
    return np.clip(np.minimum(hi[None, :], c_lo + cell) - np.maximum(lo[None, :], c_lo), 0.0, None)


def token_grid_weights(
    inverse: np.ndarray, keep: Sequence[int], resized: tuple[int, int], grid: int, patch: int
) -> np.ndarray:
    """Area-averaged token-grid masks of the segments ``keep`` (indices into the values of ``inverse``).

    ``inverse`` is the (H, W) map of per-pixel segment indices at the original resolution; the image is resized
    to ``resized = (new_h, new_w)`` and padded. The weight of token (i, j) is the area of the segment's canvas
    footprint inside the token's ``patch × patch`` cell divided by ``patch²``: exactly what
    :func:`densevlm.models.masks_to_token_grid` gives for an ideal (area-filtered) resize of the mask, and no
    segment vanishes at small scales as it can under a nearest resize.

    Computed in one pass over the pixels with weighted bincounts: a source pixel overlaps at most
    ``ceil(f / patch) + 1`` tokens per axis (``f`` the resize factor), each with the product of its row and
    column overlaps, so memory stays at K × grid² whatever the image size.
    """
    h, w = inverse.shape
    k = len(keep)
    if k == 0:
        return np.zeros((0, grid, grid), dtype=np.float32)
    slot = np.full(int(inverse.max()) + 1, -1, dtype=np.int64)
    slot[np.asarray(keep, dtype=np.int64)] = np.arange(k)
    seg = slot[inverse]  # (H, W): kept-segment slot or -1
    ys, xs = np.nonzero(seg >= 0)
    base = seg[ys, xs] * (grid * grid)
    axis_terms = []
    for n_src, n_dst, coords in ((h, resized[0], ys), (w, resized[1], xs)):
        overlap = _overlap_matrix(n_src, n_dst, grid, patch)  # (grid, n_src)
        first = np.floor(np.arange(n_src) * (n_dst / n_src) / patch).astype(np.int64)
        span = int(np.ceil(n_dst / n_src / patch)) + 1
        terms = []
        for offset in range(span):
            tok = first + offset
            inside = tok < grid
            weight = np.where(inside, overlap[np.minimum(tok, grid - 1), np.arange(n_src)], 0.0)
            terms.append((np.minimum(tok, grid - 1)[coords], weight[coords]))
        axis_terms.append(terms)
    acc = np.zeros(k * grid * grid, dtype=np.float64)
    for row_tok, row_w in axis_terms[0]:
        for col_tok, col_w in axis_terms[1]:
            weight = row_w * col_w
            nz = weight > 0
            acc += np.bincount((base + row_tok * grid + col_tok)[nz], weights=weight[nz], minlength=acc.size)
    return np.clip(acc.reshape(k, grid, grid) / float(patch * patch), 0.0, 1.0).astype(np.float32)


class PanopticRegionDataset(Dataset):
    """Ground-truth regions of a panoptic split (see the module docstring for what one item holds).

    Args:
        cfg: data config (paths, canvas size, box-size filter, segment limit).
        patch_size: the model's patch side; the token grid is ``image_size // patch_size`` square.
        vocabulary: the classes labels index into; None = the json's own categories (ids map one to one).
            Another vocabulary is matched by category id when all its classes carry ids (names must agree),
            else by name or synonym (preferring a class with the same thing flag).
        image_mean, image_std: normalisation of the model.

    Items are dicts: ``image`` (3, S, S) float, ``boxes`` (K, 4), ``masks`` (K, g, g), ``labels`` (K,) long,
    ``isthing`` (K,) bool, ``segment_ids`` (K,) long, ``image_id``, ``file_name``, ``orig_size`` (H, W),
    ``resized_size`` (h, w) of the content on the canvas.
    """

    def __init__(
        self,
        cfg: PanopticDataConfig,
        patch_size: int,
        vocabulary: Optional[Vocabulary] = None,
        *,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ) -> None:
        cfg.check_paths()
        if patch_size < 1 or cfg.image_size < patch_size:
            raise ValueError(
                f"patch_size {patch_size}: expected 1 <= patch_size <= data.image_size ({cfg.image_size})"
            )
        self.cfg = cfg
        self.patch_size = int(patch_size)
        self.grid = cfg.image_size // self.patch_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.json_path = Path(cfg.panoptic_json)
        self.png_root = cfg.resolved_panoptic_root()
        self.image_root = Path(cfg.image_root)
        if not self.png_root.is_dir():
            raise FileNotFoundError(
                f"panoptic PNG folder not found: {self.png_root} (data.panoptic_root, or the json path "
                f"{self.json_path} without .json when empty)"
            )
        data = read_json(self.json_path, "panoptic json")
        self.dataset_vocabulary = vocabulary_from_categories_file(self.json_path)
        self.vocabulary = vocabulary if vocabulary is not None else self.dataset_vocabulary
        self.categories = {int(c["id"]): c for c in data["categories"]}
        self.category_to_label = category_mapping(data["categories"], self.vocabulary, str(self.json_path))
        self.thing_ids = {cid for cid, c in self.categories.items() if bool(c.get("isthing"))}
        self.records = self._parse(data)
        if cfg.max_images is not None:
            self.records = self.records[: cfg.max_images]

    # ------------------------------------------------------------------ json

    def _parse(self, data: Mapping[str, Any]) -> list[_ImageRecord]:
        where = str(self.json_path)
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise PanopticAnnotationError(f"{where}: key '{key}' must be a list, got {data.get(key)!r:.60}")
        images = {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, Mapping) or "id" not in img or "file_name" not in img:
                raise PanopticAnnotationError(f"{where}: images[{i}] needs 'id' and 'file_name', got {img!r:.80}")
            images[img["id"]] = img
        records = []
        for a, ann in enumerate(data["annotations"]):
            if not isinstance(ann, Mapping) or not {"image_id", "file_name", "segments_info"} <= set(ann):
                raise PanopticAnnotationError(
                    f"{where}: annotations[{a}] needs 'image_id', 'file_name' and 'segments_info'"
                )
            img = images.get(ann["image_id"])
            if img is None:
                raise PanopticAnnotationError(
                    f"{where}: annotations[{a}] ({ann['file_name']}) refers to image_id {ann['image_id']!r}, "
                    "which 'images' lacks"
                )
            segments: list[_Segment] = []
            seen_ids: set[int] = set()
            for s, seg in enumerate(ann["segments_info"]):
                name = f"{where}: image {img['file_name']} (id {ann['image_id']}) segment {seg.get('id', s)!r}"
                if "id" not in seg or "category_id" not in seg:
                    raise PanopticAnnotationError(f"{name}: needs 'id' and 'category_id'")
                if int(seg["id"]) in seen_ids:
                    raise PanopticAnnotationError(f"{name}: the segment id appears twice in segments_info")
                seen_ids.add(int(seg["id"]))
                cid = int(seg["category_id"])
                if cid not in self.categories:
                    raise PanopticAnnotationError(f"{name}: category_id {cid} is not in the json's categories")
                if cid not in self.category_to_label:
                    raise PanopticAnnotationError(
                        f"{name}: category {cid} ({self.categories[cid].get('name')!r}) is not in vocabulary "
                        f"{self.vocabulary.name!r}"
                    )
                bbox = seg.get("bbox")
                if cid in self.thing_ids:
                    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                        raise PanopticAnnotationError(
                            f"{name}: a thing segment needs 'bbox' [x, y, w, h], got {bbox!r}"
                        )
                    bbox = tuple(float(v) for v in bbox)
                else:
                    bbox = None
                area = seg.get("area")
                segments.append(_Segment(int(seg["id"]), cid, bbox, int(area) if area is not None else None))
            records.append(_ImageRecord(ann["image_id"], str(img["file_name"]), str(ann["file_name"]), tuple(segments)))
        return records

    # ------------------------------------------------------------------ items

    def __len__(self) -> int:
        return len(self.records)

    def _segment_index(self, record: _ImageRecord, id_map: np.ndarray) -> np.ndarray:
        """(H, W) index of each pixel's json segment (``len(segments)`` for void), checked against the json.

        A json segment absent from the PNG and a non-void PNG id absent from the json are errors; an area that
        differs from the pixel count is a warning. (A sorted lookup is ~4× faster than ``np.unique`` here.)
        """
        where = f"{self.json_path}: image {record.file_name} (PNG {record.png_name})"
        json_ids = np.array([s.id for s in record.segments], dtype=np.int64)
        order = np.argsort(json_ids, kind="stable")
        sorted_ids = json_ids[order]
        n = len(json_ids)
        flat = id_map.ravel()
        if n:
            pos = np.minimum(np.searchsorted(sorted_ids, flat), n - 1)
            match = sorted_ids[pos] == flat
            index = np.where(match, order[pos], n)
        else:
            match = np.zeros(flat.shape, dtype=bool)
            index = np.full(flat.shape, 0, dtype=np.int64)
        stray = ~match & (flat != 0)
        if stray.any():
            extra, pixels = np.unique(flat[stray], return_counts=True)
            raise PanopticAnnotationError(
                f"{where}: PNG segment id(s) {extra[:10].tolist()} ({int(pixels.sum())} pixels) are not in the "
                "json's segments_info"
            )
        counts = np.bincount(index, minlength=n + 1)
        for j, seg in enumerate(record.segments):
            if counts[j] == 0:
                raise PanopticAnnotationError(
                    f"{where}: segment {seg.id} (category {seg.category_id}) of the json is absent from the PNG"
                )
            if seg.area is not None and seg.area != counts[j]:
                logger.warning(
                    "%s: segment %d has area %d in the json but %d pixels in the PNG",
                    where, seg.id, seg.area, int(counts[j]),
                )
        return index.reshape(id_map.shape)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        size = self.cfg.image_size
        image = load_rgb(self.image_root / record.file_name)
        id_map = load_panoptic_png(self.png_root / record.png_name)
        orig_w, orig_h = image.size
        if id_map.shape != (orig_h, orig_w):
            raise PanopticAnnotationError(
                f"{self.json_path}: image {record.file_name} is {orig_w}x{orig_h} but its PNG {record.png_name} "
                f"is {id_map.shape[1]}x{id_map.shape[0]}"
            )
        canvas, _ = resize_longest_pad(image, size)
        # The same rounding as resize_longest_pad: boxes and masks follow the content exactly as it was resized.
        new_w, new_h = resized_size(orig_w, orig_h, size)
        sx, sy = new_w / orig_w, new_h / orig_h

        inverse = self._segment_index(record, id_map)  # json segment j at pixels == j

        min_area = self.cfg.min_box_size ** 2
        max_area = None if self.cfg.max_box_size is None else self.cfg.max_box_size ** 2
        boxes, labels, isthing, seg_ids, keep = [], [], [], [], []
        for j, seg in enumerate(record.segments[: self.cfg.max_segments]):
            thing = seg.category_id in self.thing_ids
            if thing:
                x, y, bw, bh = seg.bbox  # type: ignore[misc]
                x0, y0, x1, y1 = x, y, x + bw, y + bh
            else:
                mask = inverse == j
                rows = np.flatnonzero(mask.any(axis=1))
                cols = np.flatnonzero(mask.any(axis=0))
                x0, y0, x1, y1 = float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
            box_area = (x1 - x0) * (y1 - y0)
            if box_area < min_area or (max_area is not None and box_area > max_area):
                continue
            boxes.append([x0 * sx / size, y0 * sy / size, x1 * sx / size, y1 * sy / size])
            labels.append(self.category_to_label[seg.category_id])
            isthing.append(thing)
            seg_ids.append(seg.id)
            keep.append(j)

        masks = token_grid_weights(inverse, keep, (new_h, new_w), self.grid, self.patch_size)
        if self.cfg.mask_weights == "binary":
            masks = (masks > 0).astype(np.float32)
        return {
            "image": to_tensor(canvas, self.image_mean, self.image_std),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "masks": torch.from_numpy(masks),
            "labels": torch.tensor(labels, dtype=torch.long),
            "isthing": torch.tensor(isthing, dtype=torch.bool),
            "segment_ids": torch.tensor(seg_ids, dtype=torch.long),
            "image_id": record.image_id,
            "file_name": record.file_name,
            "orig_size": (orig_h, orig_w),
            "resized_size": (new_h, new_w),
        }


def collate_regions(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: ``images`` stacked (B, 3, S, S); every per-region field a per-image list."""
    if not items:
        raise ValueError("collate_regions: empty batch")
    batch: dict[str, Any] = {"images": torch.stack([it["image"] for it in items])}
    for key in ("boxes", "masks", "labels", "isthing", "segment_ids", "image_id", "file_name", "orig_size",
                "resized_size"):
        batch[key] = [it[key] for it in items]
    return batch


def _worker_init(_: int) -> None:
    # Decoding and mask maths are numpy/PIL work; one thread per worker avoids oversubscribing the cores.
    torch.set_num_threads(1)


def region_loader(
    dataset: PanopticRegionDataset, batch_size: int, num_workers: int, *, pin_memory: bool = False
) -> DataLoader:
    """An in-order DataLoader over ``dataset`` with :func:`collate_regions`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_regions,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


# ---------------------------------------------------------------------- categories -> vocabulary


def _names_of(category: Mapping[str, Any]) -> list[str]:
    head, synonyms = split_synonyms(str(category.get("name", "")))
    extra = [s for s in category.get("synonyms", []) or [] if isinstance(s, str)]
    return [n.lower() for n in (head, *synonyms, *extra)]


def category_mapping(categories: Sequence[Mapping[str, Any]], vocabulary: Vocabulary, source: str) -> dict[int, int]:
    """Map each json category id to a vocabulary index; raise naming the category when none fits.

    With ids on every vocabulary class (the json's own categories, ``coco_panoptic``), categories match by id
    and their names must agree (a class name or synonym in common), so a vocabulary with another id scheme is
    an error rather than a silent relabelling. Otherwise categories match by name or synonym. Either way the
    thing flag must agree: thing/stuff metrics are split by it.
    """
    by_id = all(c.id is not None for c in vocabulary.classes)
    id_index = vocabulary.id_to_index() if by_id else {}
    names = {}
    for i, c in enumerate(vocabulary.classes):
        for n in c.all_names:
            names.setdefault(n.lower(), []).append(i)
    out: dict[int, int] = {}
    for cat in categories:
        cid = int(cat["id"])
        cat_names = _names_of(cat)
        thing = bool(cat.get("isthing"))
        where = f"{source}: category {cid} ({cat.get('name')!r})"
        if by_id:
            if cid not in id_index:
                continue  # a segment of this category raises, naming image and segment
            index = id_index[cid]
            vocab_names = {n.lower() for n in vocabulary.classes[index].all_names}
            if not vocab_names & set(cat_names):
                raise PanopticAnnotationError(
                    f"{where}: vocabulary {vocabulary.name!r} has id {cid} as {vocabulary.classes[index].name!r}; "
                    "the names disagree, so the two use different id schemes"
                )
        else:
            candidates = sorted({i for n in cat_names for i in names.get(n, [])})
            if not candidates:
                continue
            same_kind = [i for i in candidates if vocabulary.classes[i].isthing == thing]
            index = (same_kind or candidates)[0]
        if vocabulary.classes[index].isthing != thing:
            kind = "thing" if thing else "stuff"
            raise PanopticAnnotationError(
                f"{where}: a {kind} in the json but class {index} ({vocabulary.classes[index].name!r}) of "
                f"vocabulary {vocabulary.name!r} is not"
            )
        out[cid] = index
    return out
