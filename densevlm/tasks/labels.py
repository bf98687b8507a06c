"""``densevlm labels propose``: the teacher's labels for every region of a data source, written for review.

For each region (from ``data.regions``: grid cells, boxes or masks) the frozen teacher pools its dense map (by box or
by mask, as in training), scores it against its own text embeddings (softmax of cos / T, DenseVLM's targets) and
reports its top-k categories with probabilities, the thing/stuff route of its best class and whether it passes the
confidence threshold. Written into ``output_dir`` once everything is computed (each file atomically):

- ``proposals.coco.json``: COCO instances with ``score`` (boxes; masks as RLE), which CVAT, Label Studio, FiftyOne
  and Datumaro import; each annotation's ``attributes`` carry its region slot, route, pass flag and top-k;
- ``distributions.json``: every region's full distribution over the vocabulary, with the identity (image source,
  region source, vocabulary, teacher) that ``densevlm labels apply`` keys the corrections to;
- ``contact_sheet.html``: thumbnails with the regions coloured by label, sortable by confidence (no server).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from PIL import Image

from densevlm.config.core import to_dict
from densevlm.config.labels import LabelsProposeConfig
from densevlm.config.sources import ImageSourceConfig
from densevlm.data.region_sources import (GridSpec, ImageRegions, build_region_source, describe_identity,
                                         regions_on_canvas)
from densevlm.data.region_sources.base import source_images
from densevlm.data.sources import ImageSource
from densevlm.data.transforms import resize_longest_pad, to_tensor
from densevlm.models import create_backbone
from densevlm.utils.device import resolve_device
from densevlm.utils.io import atomic_write_json, atomic_write_text
from densevlm.viz.contact_sheet import contact_sheet_html, thumbnail
from densevlm.vocab import text_embeddings_from_config

log = logging.getLogger(__name__)

PROPOSALS = "proposals.coco.json"
DISTRIBUTIONS = "distributions.json"
SHEET = "contact_sheet.html"
FORMAT = "densevlm.labels"


def images_identity(cfg: ImageSourceConfig) -> dict[str, Any]:
    """What names the images a label or correction refers to (not how many were taken)."""
    return {"kind": cfg.kind, "path": str(Path(cfg.path).resolve()), "split": cfg.split if cfg.kind in
            ("toyworld", "hf_dataset") else ""}


def grid_spec(cfg: Any, method: str = "densevlm") -> GridSpec:
    """The grid settings of a recipe's ``data`` (``grid_style: auto`` is ``method``'s grid)."""
    return GridSpec(method if cfg.grid_style == "auto" else cfg.grid_style, cfg.max_split)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def teacher_canvas(teacher: Any, img: Image.Image, size: int) -> torch.Tensor:
    """(3, size, size) the image as the teacher labels it: longest side at ``size``, padded, normalised (training's
    canvas)."""
    return to_tensor(resize_longest_pad(img, size)[0], teacher.image_mean, teacher.image_std)


@torch.no_grad()
def region_probabilities(teacher: Any, dense: torch.Tensor, regions: ImageRegions, width: int, height: int,
                         size: int, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """(K, C) the teacher's distribution over the classes for each region of one ``width`` x ``height`` image.

    ``dense`` (1, D, g, g) is the teacher's dense map of the image's :func:`teacher_canvas`; each region is pooled
    on it by box (RoIAlign) or by mask (masked mean of the token-grid weights) as training pools it
    (:func:`regions_on_canvas`), and scored against ``text`` (C, D, unit rows): softmax of cos / ``temperature``.
    ``labels propose`` and the explorer (``densevlm app``) both label regions through this function.
    """
    placed = regions_on_canvas(regions, range(len(regions)), width, height, size, (teacher.patch_size,))
    if "masks" in placed:
        feats = teacher.pool_masks(dense, [placed["masks"][f"p{teacher.patch_size}"].to(dense.device)])
    else:
        feats = teacher.pool_boxes(dense, [placed["boxes"].to(dense.device)])
    return (F.normalize(feats.float(), dim=-1) @ text.T / temperature).softmax(-1).cpu()


@torch.no_grad()
def run_propose(cfg: LabelsProposeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Propose labels for every region of ``cfg.data`` (see the module docstring); returns a summary."""
    t0 = time.time()
    src = cfg.data.source
    if src.kind == "toyworld" and not Path(src.path).is_dir():
        raise FileNotFoundError(f"data.source.path: no toy world at {src.path}; generate one with `densevlm toyworld "
                                f"--config configs/toyworld/quick.yaml --out {src.path}` or point data.source elsewhere")
    images = ImageSource(src)
    regions = build_region_source(cfg.data.regions, images, grid_spec(cfg.data))
    device = resolve_device(cfg.device)
    teacher = create_backbone(cfg.teacher).to(device).eval()
    vocab, text = text_embeddings_from_config(teacher, cfg.teacher_text, progress=progress)
    if cfg.exclude_novel:
        text, vocab = text[~vocab.novel_mask], vocab.seen()
    text = F.normalize(text.float(), dim=-1).to(device)
    thing = vocab.thing_mask
    known = source_images(images)
    keys, image_id = known.keys, {i: iid for iid, i in known.ids.items()}
    size, k_top = cfg.data.image_size, min(cfg.top_k, len(vocab))
    category_id = [c.id if c.id is not None else i + 1 for i, c in enumerate(vocab.classes)]

    records: list[dict[str, Any]] = []
    cards: list[dict[str, Any]] = []
    coco_images, annotations = [], []
    for start in range(0, len(images), cfg.batch_size):
        batch = list(range(start, min(start + cfg.batch_size, len(images))))
        loaded = [(i, images.load(i)) for i in batch]
        per_image = [(i, img, regions.regions(i, img.width, img.height)) for i, img in loaded]
        canvases = torch.stack([teacher_canvas(teacher, img, size) for _, img, _ in per_image]).to(device)
        dense = teacher.encode_dense(canvases)
        for b, (i, img, reg) in enumerate(per_image):
            probs = region_probabilities(teacher, dense[b:b + 1], reg, img.width, img.height, size, text,
                                         cfg.densevlm.temperature)
            iid = image_id.get(i, i + 1)
            coco_images.append({"id": iid, "file_name": keys[i], "width": img.width, "height": img.height})
            masks = reg.masks() if reg.masks is not None else None
            image_records = []
            for k in range(len(reg)):
                p = probs[k]
                top_p, top_i = p.topk(k_top)
                label = int(top_i[0])
                x0, y0, x1, y1 = reg.boxes[k].tolist()
                rec = {"image": keys[i], "image_id": iid, "slot": reg.slots[k], "region_id": reg.ids[k],
                       "bbox": [x0, y0, x1 - x0, y1 - y0], "label": vocab.classes[label].name,
                       "class_index": label, "score": float(top_p[0]),
                       "route": "thing" if bool(thing[label]) else "stuff",
                       "passes": bool(top_p[0] > cfg.densevlm.threshold),
                       "top": [[vocab.classes[int(j)].name, float(q)] for q, j in zip(top_p, top_i)]}
                ann = {"id": len(annotations) + 1, "image_id": iid, "category_id": category_id[label],
                       "bbox": rec["bbox"], "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0, "score": rec["score"],
                       "attributes": {"densevlm_region": reg.slots[k], "route": rec["route"],
                                      "passes": rec["passes"],
                                      "top_k": "; ".join(f"{n} {q:.3f}" for n, q in rec["top"])}}
                if masks is not None:
                    ann["segmentation"] = _rle(masks[k])
                    ann["area"] = float(masks[k].sum())
                annotations.append(ann)
                image_records.append(rec)
                records.append({**rec, "probs": [round(float(q), 6) for q in p]})
            if len(cards) < cfg.sheet_images:
                cards.append({"name": keys[i], "jpeg": thumbnail(img, image_records, masks, cfg.thumb_size),
                              "regions": image_records})
        if progress:
            log.info("labels propose: %d/%d images", batch[-1] + 1, len(images))

    region_id = regions.identity()
    identity = {"images": images_identity(cfg.data.source), "regions": region_id,
                "vocabulary": {"name": vocab.name, "fingerprint": vocab.fingerprint},
                "teacher": {"name": teacher.name, "weights_id": teacher.weights_id}}
    passes = sum(r["passes"] for r in records)
    summary = {"images": len(images), "regions": len(records), "passing": passes,
               "passing_fraction": round(passes / max(1, len(records)), 4),
               "thing_regions": sum(r["route"] == "thing" for r in records), "region_source": describe_identity(region_id),
               "vocabulary": vocab.name, "classes": len(vocab), "threshold": cfg.densevlm.threshold,
               "seconds": round(time.time() - t0, 1), "output_dir": cfg.output_dir}
    coco = {"info": {"description": f"densevlm labels propose: teacher {teacher.name} on "
                                    f"{describe_identity(region_id)}"},
            "images": coco_images, "annotations": annotations,
            "categories": [{"id": category_id[i], "name": c.name, "isthing": int(c.isthing),
                            "supercategory": "thing" if c.isthing else "stuff"} for i, c in enumerate(vocab.classes)]}
    distributions = {"format": FORMAT, "version": 1, "identity": identity,
                     "vocabulary": [{"name": c.name, "isthing": c.isthing, "id": category_id[i]}
                                    for i, c in enumerate(vocab.classes)],
                     "temperature": cfg.densevlm.temperature, "threshold": cfg.densevlm.threshold,
                     "pooling": regions.pooling, "config": to_dict(cfg), "summary": summary, "regions": records}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PROPOSALS, coco, indent=None)
    atomic_write_json(out / DISTRIBUTIONS, distributions, indent=None)
    atomic_write_text(out / SHEET, contact_sheet_html(f"teacher labels: {describe_identity(region_id)}", cards, summary))
    return summary

