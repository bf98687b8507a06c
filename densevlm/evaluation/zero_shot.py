"""Image-level zero-shot classification of the largest thing and the largest stuff region.

This is the pre-training quality check: a CLIP that has learned the world names, from the whole image, the
largest thing (classified among the thing classes) and the largest stuff region (among the stuff classes).
Ground truth comes from any COCO-panoptic-format json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from densevlm.data.images import load_rgb
from densevlm.data.transforms import CLIP_MEAN, CLIP_STD, to_tensor
from densevlm.utils.io import read_json


@dataclass
class LargestSegments:
    file_name: str
    thing: Optional[int]  # vocabulary index of the largest thing, None if the image has no thing
    stuff: Optional[int]


def largest_segments(panoptic_json: str | Path, id_to_index: dict[int, int], isthing: dict[int, bool]) -> list[LargestSegments]:
    """Per image, the vocabulary indices of the largest thing segment and the largest stuff segment."""
    data = read_json(panoptic_json, "panoptic json")
    files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    out = []
    for ann in data["annotations"]:
        best: dict[bool, tuple[int, int]] = {}
        for seg in ann["segments_info"]:
            cid = seg["category_id"]
            if cid not in id_to_index:
                raise ValueError(f"{panoptic_json}: image {ann['image_id']} segment {seg['id']} has category "
                                 f"{cid}, which the vocabulary lacks")
            kind = isthing[cid]
            if kind not in best or seg["area"] > best[kind][0]:
                best[kind] = (seg["area"], id_to_index[cid])
        name = files.get(ann["image_id"], Path(ann["file_name"]).with_suffix(".jpg").name)
        out.append(LargestSegments(name, best.get(True, (0, None))[1], best.get(False, (0, None))[1]))
    return out


def _accuracy(pred: np.ndarray, gt: np.ndarray, novel: np.ndarray) -> dict[str, float]:
    res = {"top1": float((pred == gt).mean() * 100) if len(gt) else float("nan")}
    for name, sel in (("seen", ~novel[gt]), ("novel", novel[gt])):
        if sel.any():
            res[f"top1.{name}"] = float((pred[sel] == gt[sel]).mean() * 100)
    return res


@torch.no_grad()
def image_zero_shot(model: Any, text_embeddings: torch.Tensor, vocabulary: Any, panoptic_json: str | Path,
                    image_root: str | Path, image_size: int, *, batch_size: int = 64,
                    max_images: Optional[int] = None, progress: bool = True) -> dict[str, Any]:
    """Top-1 accuracy (percent) of the largest thing among thing classes and largest stuff among stuff classes.

    Returns metrics under ``zeroshot.thing.top1``, ``zeroshot.stuff.top1`` (and ``.seen`` / ``.novel``), plus
    ``confusion`` matrices (numpy) for figures.
    """
    index = {c.id: i for i, c in enumerate(vocabulary.classes)}
    isthing = {c.id: c.isthing for c in vocabulary.classes}
    items = largest_segments(panoptic_json, index, isthing)[: max_images or None]
    thing_idx = torch.tensor([i for i, c in enumerate(vocabulary.classes) if c.isthing])
    stuff_idx = torch.tensor([i for i, c in enumerate(vocabulary.classes) if not c.isthing])
    novel = np.array([c.novel for c in vocabulary.classes])
    text = F.normalize(text_embeddings.float(), dim=-1)
    device = next(model.parameters()).device
    preds = {"thing": [], "stuff": []}
    gts = {"thing": [], "stuff": []}
    mean, std = getattr(model, "image_mean", CLIP_MEAN), getattr(model, "image_std", CLIP_STD)
    for start in tqdm(range(0, len(items), batch_size), desc="zero-shot", disable=not progress, leave=False):
        chunk = items[start:start + batch_size]
        imgs = []
        for it in chunk:
            img = load_rgb(Path(image_root) / it.file_name).resize((image_size, image_size))
            imgs.append(to_tensor(img, mean, std))
        feats = F.normalize(model.encode_image(torch.stack(imgs).to(device)).float(), dim=-1).cpu()
        sims = feats @ text.t()
        for kind, idx in (("thing", thing_idx), ("stuff", stuff_idx)):
            if len(idx) == 0:
                continue
            best = idx[sims[:, idx].argmax(-1)]
            for it, p in zip(chunk, best.tolist()):
                gt = getattr(it, kind)
                if gt is not None:
                    preds[kind].append(p)
                    gts[kind].append(gt)
    metrics: dict[str, Any] = {}
    confusion = {}
    for kind in ("thing", "stuff"):
        pred, gt = np.array(preds[kind], dtype=int), np.array(gts[kind], dtype=int)
        for k, v in _accuracy(pred, gt, novel).items():
            metrics[f"zeroshot.{kind}.{k}"] = round(v, 2)
        n = len(vocabulary.classes)
        cm = np.zeros((n, n), dtype=np.int64)
        np.add.at(cm, (gt, pred), 1)
        confusion[kind] = cm
    metrics["zeroshot.images"] = len(items)
    return {"metrics": metrics, "confusion": confusion}
