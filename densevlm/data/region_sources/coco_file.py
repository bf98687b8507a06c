"""Reading region files: a COCO json (ground truth or proposals with ``score``), a COCO results list, a SAM-style
``{file_name: [masks]}`` mapping, or a COCO-panoptic json; each region tied to an image of the image source.

Regions are matched to images by ``file_name`` when the file lists its ``images`` (or is keyed by file name), else
by ``image_id`` against the ids of the image source's own json. A region for an image the source lacks, a box
outside its image and an empty mask are :class:`~densevlm.data.region_sources.base.RegionSourceError` s naming the
file and the region; nothing is written before the file has been read whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pycocotools.mask as mask_utils

from densevlm.data.region_sources.base import RegionSourceError, source_images
from densevlm.data.sources import ImageSource
from densevlm.utils.io import read_json

#: A box edge may lie this far outside its image (pixels) before it is an error: proposals rounded to the pixel.
BOX_TOLERANCE = 1.0


@dataclass
class Entry:
    """One region of the file: its id, box ``[x0, y0, x1, y1]`` (None: from the mask), score, segmentation (COCO
    RLE / polygons; for a panoptic file the segment id), category id (or None)."""

    id: Any
    box: Optional[tuple[float, float, float, float]]
    score: float
    segmentation: Any = None
    category: Any = None


@dataclass
class RegionFile:
    """A region file read whole: per image index, its entries in file order, and the image sizes it states."""

    path: Path
    entries: dict[int, list[Entry]]
    sizes: dict[int, tuple[int, int]]  # image index -> (width, height), where the file says
    panoptic: Optional[dict[int, str]] = None  # image index -> PNG file name (a panoptic json)


def _score(ann: dict[str, Any]) -> float:
    for key in ("score", "predicted_iou"):  # proposals; SAM's automatic masks
        if key in ann:
            return float(ann[key])
    return 1.0


def _box(ann: dict[str, Any], where: str) -> Optional[tuple[float, float, float, float]]:
    bbox = ann.get("bbox")
    if bbox is None:
        return None
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        raise RegionSourceError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if not (w > 0 and h > 0):
        raise RegionSourceError(f"{where}: empty box [x, y, w, h] = {bbox} (width and height must be > 0)")
    return (x, y, x + w, y + h)


def check_box(box: tuple[float, float, float, float], width: int, height: int, where: str) -> None:
    """A box must lie inside its ``width`` x ``height`` image (within :data:`BOX_TOLERANCE` pixels)."""
    x0, y0, x1, y1 = box
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise RegionSourceError(f"{where}: box [x0, y0, x1, y1] = {[round(v, 2) for v in box]} lies outside its "
                                f"{width}x{height} image")


def decode_mask(seg: Any, width: int, height: int, where: str) -> np.ndarray:
    """(H, W) bool mask of a COCO segmentation (compressed or plain RLE, polygons); errors name ``where``."""
    try:
        if isinstance(seg, dict):
            size = [int(v) for v in seg.get("size", [height, width])]
            if size != [height, width]:
                raise RegionSourceError(f"{where}: RLE size {size} (h, w) but the image is {height}x{width} (h x w)")
            counts = seg["counts"]
            rle = (mask_utils.frPyObjects(seg, height, width) if isinstance(counts, list)
                   else {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
        elif isinstance(seg, list) and seg:
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        else:
            raise RegionSourceError(f"{where}: segmentation must be an RLE dict or a list of polygons, got "
                                    f"{str(seg)[:60]}")
        mask = mask_utils.decode(rle).astype(bool)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, RegionSourceError):
            raise
        raise RegionSourceError(f"{where}: unreadable segmentation ({err})") from None
    if not mask.any():
        raise RegionSourceError(f"{where}: empty mask (no pixel set)")
    return mask


def read_region_file(path: str | Path, images: ImageSource, *, need_masks: bool) -> RegionFile:
    """Read ``path`` (see the module docstring) for the images of ``images``."""
    p = Path(path)
    data = read_json(p, "region file")
    known = source_images(images)
    keys = known.keys
    by_name = {k: i for i, k in enumerate(keys)}
    by_basename = {Path(k).name: i for i, k in enumerate(keys)}
    all_basenames = {Path(n).name for n in known.all_names}

    def index_of_name(name: str, where: str) -> Optional[int]:
        i = by_name.get(name, by_basename.get(Path(name).name))
        if i is None and not (known.has_name(name) or Path(name).name in all_basenames):
            raise RegionSourceError(f"{where}: image {name!r} is not in the image source "
                                    f"({images.cfg.kind}:{images.cfg.path}, {len(known.all_names)} images)")
        return i  # None: an image of the source that max_images leaves out

    def index_of_id(image_id: Any, where: str) -> Optional[int]:
        if image_id not in known.all_ids:
            have = (f"it has ids {', '.join(map(str, sorted(known.all_ids, key=str)[:5]))}, ..." if known.all_ids
                    else "it has no image ids (a folder)")
            raise RegionSourceError(f"{where}: image_id {image_id!r} is not in the image source "
                                    f"({images.cfg.kind}:{images.cfg.path}; {have})")
        return known.ids.get(image_id)

    entries: dict[int, list[Entry]] = {}
    sizes: dict[int, tuple[int, int]] = {}
    panoptic: Optional[dict[int, str]] = None

    def add(index: Optional[int], ann: dict[str, Any], where: str, k: int) -> None:
        if index is None:
            return
        seg = ann.get("segmentation")
        if need_masks and seg is None:
            raise RegionSourceError(f"{where}: no 'segmentation' (a masks region source needs RLE or polygons)")
        box = _box(ann, where)
        if index in sizes and box is not None:
            check_box(box, *sizes[index], where)
        if need_masks and isinstance(seg, dict) and isinstance(seg.get("counts"), str):
            rle = {"size": seg.get("size"), "counts": seg["counts"].encode("ascii")}
            if int(mask_utils.area(rle)) == 0:
                raise RegionSourceError(f"{where}: empty mask (no pixel set)")
        entries.setdefault(index, []).append(Entry(ann.get("id", k), box, _score(ann), seg, ann.get("category_id")))

    if isinstance(data, dict) and isinstance(data.get("images"), list):
        file_index: dict[Any, Optional[int]] = {}
        for img in data["images"]:
            where = f"{p}: images entry {img.get('id')!r}"
            i = index_of_name(str(img.get("file_name", "")), where)
            file_index[img.get("id")] = i
            if i is not None and "width" in img and "height" in img:
                sizes[i] = (int(img["width"]), int(img["height"]))
        anns = data.get("annotations", [])
        if anns and "segments_info" in anns[0]:  # a COCO-panoptic json: one annotation per image
            panoptic = {}
            for a in anns:
                i = file_index.get(a.get("image_id"))
                if a.get("image_id") not in file_index:
                    raise RegionSourceError(f"{p}: annotation of image_id {a.get('image_id')!r}, which 'images' lacks")
                if i is None:
                    continue
                panoptic[i] = str(a["file_name"])
                for s in a["segments_info"]:
                    where = f"{p}: image {a.get('image_id')!r} segment {s.get('id')!r}"
                    box = _box(s, where)
                    if box is not None and i in sizes:
                        check_box(box, *sizes[i], where)
                    entries.setdefault(i, []).append(Entry(s["id"], box, _score(s), int(s["id"]), s.get("category_id")))
        else:
            for k, ann in enumerate(anns):
                where = f"{p}: annotation {ann.get('id', k)!r}"
                if ann.get("image_id") not in file_index:
                    raise RegionSourceError(f"{where}: image_id {ann.get('image_id')!r} is not in the file's 'images'")
                add(file_index[ann.get("image_id")], ann, where, k)
    elif isinstance(data, list):  # a COCO results list
        for k, ann in enumerate(data):
            where = f"{p}: result {ann.get('id', k)!r}"
            add(index_of_id(ann.get("image_id"), where), ann, where, k)
    elif isinstance(data, dict):  # SAM style: {file_name: [mask records]}
        for name, anns in data.items():
            i = index_of_name(name, f"{p}: image {name!r}")
            for k, ann in enumerate(anns if isinstance(anns, list) else []):
                add(i, ann, f"{p}: image {name!r} mask {ann.get('id', k)!r}", k)
    else:
        raise RegionSourceError(f"{p}: expected a COCO json (images, annotations), a COCO results list or a "
                                f"{{file_name: [masks]}} mapping, got a {type(data).__name__}")
    return RegionFile(p, entries, sizes, panoptic)
