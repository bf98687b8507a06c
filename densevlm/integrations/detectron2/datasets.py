"""Open-vocabulary detection splits in detectron2's catalogs: OV-COCO (48 base / 17 novel) and the toy world.

OV-COCO is the split of the OV detection literature (OVR-CNN, Bansal et al.'s zero-shot split; used by ViLD,
Detic, F-ViT): 65 COCO categories, of which 17 are novel. Its annotation files are made from COCO 2017 by
:func:`make_ovcoco_annotations` (``tools/make_ovcoco_annotations.py``): the training file keeps the base
categories' annotations only (images keep their novel objects, unlabelled), the validation file all 65.

Every dataset is registered with ``thing_classes`` (all classes, so train and test share contiguous ids),
``novel_classes`` and ``evaluator_type="coco"``; loading a training split checks that no annotation is novel.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from densevlm.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

#: OV-COCO novel categories (17), COCO 2017 names.
OVCOCO_NOVEL = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife",
    "cake", "couch", "keyboard", "sink", "scissors",
)
#: OV-COCO base categories (48), COCO 2017 names.
OVCOCO_BASE = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep", "bear",
    "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard", "bottle", "fork",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock",
    "vase", "toothbrush",
)
OVCOCO_TRAIN_JSON = "instances_train2017_ovcoco_base.json"
OVCOCO_VAL_JSON = "instances_val2017_ovcoco_all.json"


def make_ovcoco_annotations(coco_json: str | Path, out: str | Path, *, base_only: bool) -> dict[str, int]:
    """Write the OV-COCO version of a COCO 2017 instances json (atomically): the 65 categories in COCO id order,
    annotations of the other 15 removed, and with ``base_only`` (the training file) the novel ones too.

    Returns counts (images, annotations kept, annotations removed).
    """
    data = read_json(coco_json, "COCO instances json")
    keep = set(OVCOCO_BASE) | (set() if base_only else set(OVCOCO_NOVEL))
    by_name = {c["name"]: c for c in data.get("categories", [])}
    missing = sorted((set(OVCOCO_BASE) | set(OVCOCO_NOVEL)) - set(by_name))
    if missing:
        raise ValueError(f"{coco_json}: not a COCO 2017 instances json, categories {missing} are missing")
    categories = sorted((by_name[n] for n in set(OVCOCO_BASE) | set(OVCOCO_NOVEL)), key=lambda c: c["id"])
    kept_ids = {by_name[n]["id"] for n in keep}
    annotations = [a for a in data["annotations"] if a["category_id"] in kept_ids]
    out_data = {k: v for k, v in data.items() if k not in ("annotations", "categories")}
    out_data.update(categories=categories, annotations=annotations)
    atomic_write_json(out, out_data, indent=None)
    return {"images": len(data["images"]), "annotations": len(annotations),
            "removed": len(data["annotations"]) - len(annotations)}


def dataset_name(kind: str, split: str, json_file: str | Path, image_root: str | Path, limit: Optional[int],
                 rule: str = "") -> str:
    """A catalog name unique to the files and loading rule (registering the same twice reuses the name)."""
    key = f"{Path(json_file).resolve()}|{Path(image_root).resolve()}|{limit}|{rule}"
    return f"densevlm_{kind}_{split}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _categories(json_file: Path) -> list[dict[str, Any]]:
    return sorted(read_json(json_file, "instances json").get("categories", []), key=lambda c: c["id"])


def split_classes(kind: str, root: str | Path, json_file: Path) -> tuple[list[str], list[str]]:
    """(all classes in category-id order, novel classes) of a split; the json's categories must match the split."""
    names = [c["name"] for c in _categories(json_file)]
    if not names:
        raise ValueError(f"{json_file}: no 'categories'")
    if kind == "ovcoco":
        expected = set(OVCOCO_BASE) | set(OVCOCO_NOVEL)
        if set(names) != expected:
            extra, absent = sorted(set(names) - expected), sorted(expected - set(names))
            raise ValueError(f"{json_file}: expected the 65 OV-COCO categories (extra {extra}, missing {absent}); "
                             "make the files with tools/make_ovcoco_annotations.py")
        return names, [n for n in names if n in OVCOCO_NOVEL]
    if kind == "toyworld":
        from densevlm.vocab import get_vocabulary

        novel = {c.name for c in get_vocabulary(str(root)).classes if c.novel}
        return names, [n for n in names if n in novel]
    raise ValueError(f"data.kind: expected 'ovcoco' or 'toyworld', got {kind!r}")


def load_ov_split(json_file: str | Path, image_root: str | Path, name: str, *, train: bool,
                  novel_in_train: str = "error", limit: Optional[int] = None) -> list[dict[str, Any]]:
    """detectron2's ``load_coco_json`` plus the open-vocabulary rule: a training split holds no novel annotation
    (``novel_in_train="error"`` raises naming the file, class and image; ``"drop"`` removes such annotations)."""
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    records = load_coco_json(str(json_file), str(image_root), name)
    if limit is not None:
        records = records[:limit]
    if not train:
        return records
    meta = MetadataCatalog.get(name)
    novel_ids = {meta.thing_classes.index(n) for n in meta.novel_classes}
    dropped = 0
    for r in records:
        bad = [a for a in r["annotations"] if a["category_id"] in novel_ids]
        if bad and novel_in_train == "error":
            cls = meta.thing_classes[bad[0]["category_id"]]
            raise ValueError(f"{json_file}: image {r['file_name']} has an annotation of the novel class '{cls}'; "
                             "a training split must hold base classes only (OV-COCO: use the base file from "
                             "tools/make_ovcoco_annotations.py; or set data.novel_in_train=drop)")
        if bad:
            dropped += len(bad)
            r["annotations"] = [a for a in r["annotations"] if a["category_id"] not in novel_ids]
    if dropped:
        log.info("%s: dropped %d novel-class annotations from the training split", name, dropped)
    # the open-vocabulary promise, checked on what the trainer will actually see
    assert not any(a["category_id"] in novel_ids for r in records for a in r["annotations"]), name
    return records


def register_ov_split(kind: str, root: str | Path, json_rel: str, images_rel: str, split: str, *,
                      train: bool, novel_in_train: str = "error", limit: Optional[int] = None) -> str:
    """Register one split in ``DatasetCatalog`` / ``MetadataCatalog`` and return its name (idempotent)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = Path(root)
    json_file, image_root = root / json_rel, root / images_rel
    if not json_file.is_file():
        hint = (" (make it with tools/make_ovcoco_annotations.py from COCO 2017's instances json)"
                if kind == "ovcoco" else "")
        raise FileNotFoundError(f"data: annotation file not found: {json_file}{hint}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"data: image folder not found: {image_root}")
    name = dataset_name(kind, split, json_file, image_root, limit, f"train:{novel_in_train}" if train else "test")
    if name in DatasetCatalog.list():
        return name
    classes, novel = split_classes(kind, root, json_file)
    DatasetCatalog.register(name, lambda: load_ov_split(json_file, image_root, name, train=train,
                                                        novel_in_train=novel_in_train, limit=limit))
    MetadataCatalog.get(name).set(thing_classes=classes, novel_classes=novel, json_file=str(json_file),
                                  image_root=str(image_root), evaluator_type="coco", ov_kind=kind)
    return name


def novel_mask(metadata: Any, classes: Sequence[str]) -> list[bool]:
    """One flag per class of ``classes``: novel in ``metadata`` (a detectron2 Metadata)."""
    novel = set(metadata.get("novel_classes", []))
    return [c in novel for c in classes]
