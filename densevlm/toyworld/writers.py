"""Write toy-world images and annotations in the formats real datasets use (COCO captions, instances, panoptic;
semantic label PNGs), so that one set of loaders serves both.

Per-image files are written by the worker that renders the image; the JSON files are assembled from the
workers' records in image order. All JSON is written with sorted keys and no timestamps, so the same seed and
config give byte-identical files.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from densevlm.toyworld.render import RenderedImage

INFO = {
    "description": "densevlm toy world: a procedurally generated open-vocabulary dataset",
    "url": "",
    "version": "1",
    "contributor": "densevlm",
}
LICENSES = [{"id": 1, "name": "generated data, no restrictions", "url": ""}]
# Label maps are runs of equal pixels: zlib's run-length strategy is faster and smaller than its default here.
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
UNLABELED = 255  # semantic PNG value of pixels without a category (only a close-up's plain background)


def stem(image_id: int) -> str:
    """File stem of an image: the zero-padded image id, as in COCO ('000000000001')."""
    return f"{image_id:012d}"


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic encoding: id = R + 256 G + 256^2 B."""
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def segment_ids(rng: np.random.Generator, rendered: RenderedImage, colours: dict[str, Sequence[int]]) -> list[int]:
    """Panoptic segment ids that are also pleasant colours: a stuff segment takes its category colour, a thing
    instance a jittered copy of its category colour; all distinct and non-zero (0 is void)."""
    used: set[int] = set()
    # Stuff first, so that a thing can never take a stuff colour.
    order = sorted(range(len(rendered.segments)), key=lambda i: rendered.segments[i].isthing)
    chosen: dict[int, int] = {}
    for i in order:
        seg = rendered.segments[i]
        rgb = [int(v) for v in colours[seg.category]]
        if seg.isthing:
            rgb = [min(max(v + int(d), 0), 255) for v, d in zip(rgb, rng.integers(-40, 41, 3))]
        sid = rgb[0] + 256 * rgb[1] + 65536 * rgb[2]
        while sid == 0 or sid in used:
            sid = int(rng.integers(1, 2**24))
        used.add(sid)
        chosen[i] = sid
    return [chosen[i] for i in range(len(rendered.segments))]


def write_image_files(
    rendered: RenderedImage, root: Path, split: str, image_id: int, ids: Sequence[int],
    category_index: dict[str, int], jpeg_quality: int,
) -> None:
    """The JPEG, the panoptic PNG and the semantic PNG of one image (inside the staging directory)."""
    name = stem(image_id)
    Image.fromarray(rendered.image).save(root / "images" / split / f"{name}.jpg", format="JPEG", quality=jpeg_quality)
    # One colour (label) per segment, then one gather; the entry after the last is void (id 0, UNLABELED).
    lut_rgb = id_to_rgb(np.asarray([*ids, 0], np.uint32))
    Image.fromarray(np.take(lut_rgb, rendered.segment_map, axis=0)).save(
        root / "annotations" / f"panoptic_{split}" / f"{name}.png", format="PNG", **PNG_OPTIONS)
    lut_sem = np.asarray([*(category_index[s.category] for s in rendered.segments), UNLABELED], np.uint8)
    Image.fromarray(np.take(lut_sem, rendered.segment_map)).save(
        root / "annotations" / f"semantic_{split}" / f"{name}.png", format="PNG", **PNG_OPTIONS)


def image_record(
    rendered: RenderedImage, image_id: int, ids: Sequence[int], category_ids: dict[str, int]
) -> dict[str, Any]:
    """What the JSON files need of one image (small: masks travel as compressed RLE)."""
    size = rendered.image.shape[0]
    segments = []
    for seg, sid in zip(rendered.segments, ids):
        entry: dict[str, Any] = {
            "id": sid, "category_id": category_ids[seg.category], "area": seg.area, "bbox": seg.bbox,
            "iscrowd": 0, "isthing": int(seg.isthing),
        }
        if seg.isthing:
            rle = mask_utils.encode(np.asfortranarray(seg.mask.astype(np.uint8)))
            entry["rle"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        segments.append(entry)
    image: dict[str, Any] = {"id": image_id, "file_name": f"{stem(image_id)}.jpg", "width": size, "height": size}
    if rendered.kind != "scene":  # a close-up says so; scene entries stay as they always were (no 'kind')
        image["kind"] = rendered.kind
    return {
        "image": image,
        "captions": list(rendered.captions),
        "segments": segments,
    }


def coco_files(records: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]],
               supercategories: dict[str, str], first_caption_id: int, first_instance_id: int,
               ) -> tuple[dict, dict, dict]:
    """The captions, instances and panoptic JSON objects of one split, from its image records in order."""
    images = [r["image"] for r in records]
    caption_anns, instance_anns, panoptic_anns = [], [], []
    for r in records:
        image_id = r["image"]["id"]
        for text in r["captions"]:
            caption_anns.append({"id": first_caption_id + len(caption_anns), "image_id": image_id, "caption": text})
        infos = []
        for seg in r["segments"]:
            infos.append({k: seg[k] for k in ("id", "category_id", "area", "bbox", "iscrowd")})
            if seg["isthing"]:
                instance_anns.append({
                    "id": first_instance_id + len(instance_anns), "image_id": image_id,
                    "category_id": seg["category_id"], "segmentation": seg["rle"], "area": seg["area"],
                    "bbox": seg["bbox"], "iscrowd": 0,
                })
        panoptic_anns.append({"image_id": image_id, "file_name": f"{stem(image_id)}.png", "segments_info": infos})
    thing_cats = [{"id": c["id"], "name": c["name"], "supercategory": supercategories[c["name"]]}
                  for c in table if c["isthing"]]
    pan_cats = [{"id": c["id"], "name": c["name"], "isthing": c["isthing"],
                 "supercategory": supercategories[c["name"]], "color": c["color"]} for c in table]
    head = {"info": INFO, "licenses": LICENSES, "images": images}
    return (
        {**head, "annotations": caption_anns},
        {**head, "annotations": instance_anns, "categories": thing_cats},
        {**head, "annotations": panoptic_anns, "categories": pan_cats},
    )


def dump_json(obj: Any, path: Path, indent: int | None = None) -> None:
    """Deterministic JSON: sorted keys, fixed separators, a final newline."""
    seps = (",", ": ") if indent is not None else (",", ":")
    path.write_text(json.dumps(obj, sort_keys=True, indent=indent, separators=seps, ensure_ascii=False) + "\n",
                    encoding="utf-8")
