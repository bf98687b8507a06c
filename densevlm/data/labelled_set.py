"""A small labelled set in both forms the evaluations read: panoptic (regions) and semantic PNGs (pixels).

A COCO panoptic set gets semantic PNGs (each pixel its segment's class index in the vocabulary's order, the
ignore label where no segment is); a set of semantic PNGs gets a panoptic json and PNGs (each class present in an
image one segment, with its box). Either way the result is one :class:`LabelledSet` whose files live in one
folder, so region classification and segmentation score exactly the same images and labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from densevlm.config.report import LabelledSetConfig
from densevlm.config.semseg import SemSegDataConfig
from densevlm.data.panoptic import PanopticAnnotationError, category_mapping, load_panoptic_png
from densevlm.data.semseg import check_label, list_samples, read_label
from densevlm.utils.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from densevlm.vocab.registry import get_vocabulary, vocabulary_from_categories_file
from densevlm.vocab.vocabulary import Vocabulary

logger = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    """Both forms of one labelled set: the panoptic json and PNG folder, the semantic PNG folder and split file
    (stems, one a line), the vocabulary (and its file), and the labelled pixels of every class."""

    vocabulary: Vocabulary
    vocabulary_file: Path
    panoptic_json: Path
    panoptic_root: Path
    image_root: Path
    semantic_root: Path
    split_file: Path
    image_suffix: str
    stems: list[str]
    class_pixels: np.ndarray

    @property
    def unlabelled_classes(self) -> list[str]:
        """Classes of the vocabulary with no labelled pixel in the set."""
        return [c.name for c, n in zip(self.vocabulary.classes, self.class_pixels) if n == 0]


def _write_png(path: Path, array: np.ndarray, mode: str) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array, mode=mode).save(tmp, format="png")


def _label_png(label: np.ndarray, path: Path) -> None:
    """Class indices as an 8-bit PNG (16-bit when a value does not fit)."""
    if label.max(initial=0) <= 255:
        _write_png(path, label.astype(np.uint8), "L")
    else:
        _write_png(path, label.astype(np.uint16), "I;16")


def _one_suffix(file_names: list[str], where: str) -> str:
    suffixes = sorted({Path(f).suffix for f in file_names})
    if len(suffixes) != 1:
        raise ValueError(f"{where}: the images must share one file suffix to be paired with label PNGs, got "
                         f"{suffixes}")
    return suffixes[0]


def _from_panoptic(cfg: LabelledSetConfig, out: Path) -> LabelledSet:
    json_path = Path(cfg.panoptic_json)
    data = read_json(json_path, "panoptic json")
    vocabulary = get_vocabulary(cfg.classes) if cfg.classes else vocabulary_from_categories_file(json_path)
    to_label = category_mapping(data["categories"], vocabulary, str(json_path))
    root = Path(cfg.panoptic_root) if cfg.panoptic_root else json_path.with_suffix("")
    if not root.is_dir():
        raise FileNotFoundError(f"data.panoptic_root: panoptic PNG folder not found: {root}")
    by_image = {a["image_id"]: a for a in data["annotations"]}
    images = [img for img in data["images"] if img["id"] in by_image]
    if cfg.max_images is not None:
        images = images[: cfg.max_images]
    if not images:
        raise ValueError(f"{json_path}: no image with an annotation")
    suffix = _one_suffix([img["file_name"] for img in images], str(json_path))
    pixels = np.zeros(len(vocabulary), dtype=np.int64)
    stems = []
    for img in images:
        ann = by_image[img["id"]]
        ids = load_panoptic_png(root / ann["file_name"])
        label = np.full(ids.shape, cfg.ignore_label, dtype=np.int64)
        for seg in ann["segments_info"]:
            cid = int(seg["category_id"])
            if cid not in to_label:
                raise PanopticAnnotationError(f"{json_path}: image {img['file_name']} segment {seg['id']}: category "
                                              f"{cid} is not in vocabulary {vocabulary.name!r}")
            label[ids == int(seg["id"])] = to_label[cid]
        stem = img["file_name"][: -len(suffix)]
        _label_png(label, out / "semantic" / f"{stem}.png")
        pixels += np.bincount(label[label != cfg.ignore_label].ravel(), minlength=len(vocabulary))[: len(vocabulary)]
        stems.append(stem)
    trimmed = {**{k: v for k, v in data.items() if k not in ("images", "annotations")},
               "images": images, "annotations": [by_image[img["id"]] for img in images]}
    atomic_write_json(out / "panoptic.json", trimmed, indent=None)
    return _finish(cfg, out, vocabulary, out / "panoptic.json", root, stems, suffix, pixels)


def _from_semantic(cfg: LabelledSetConfig, out: Path) -> LabelledSet:
    vocabulary = get_vocabulary(cfg.classes)
    data_cfg = SemSegDataConfig(image_root=cfg.image_root, label_root=cfg.label_root, image_suffix=cfg.image_suffix,
                                label_suffix=cfg.label_suffix, ignore_label=cfg.ignore_label,
                                max_images=cfg.max_images)
    samples, _ = list_samples(data_cfg)
    with_ids = all(c.id is not None for c in vocabulary.classes)
    cat_ids = [c.id if with_ids else i + 1 for i, c in enumerate(vocabulary.classes)]
    categories = [{"id": cid, "name": c.name, "isthing": int(c.isthing), "synonyms": list(c.synonyms)}
                  for cid, c in zip(cat_ids, vocabulary.classes)]
    pixels = np.zeros(len(vocabulary), dtype=np.int64)
    images, annotations, stems = [], [], []
    for n, sample in enumerate(samples):
        label = read_label(sample.label, ignore_label=cfg.ignore_label)
        check_label(label, len(vocabulary), cfg.ignore_label, sample.label)
        ids = np.zeros(label.shape, dtype=np.int64)
        segments = []
        for k in np.unique(label[label != cfg.ignore_label]).tolist():
            mask = label == k
            ys, xs = np.nonzero(mask)
            seg_id = k + 1  # 0 stays "no segment" in the RGB encoding
            ids[mask] = seg_id
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            segments.append({"id": seg_id, "category_id": cat_ids[k], "iscrowd": 0, "bbox": box,
                             "area": int(mask.sum())})
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        _write_png(out / "panoptic" / f"{sample.stem}.png", rgb, "RGB")
        pixels += np.bincount(label[label != cfg.ignore_label].ravel(), minlength=len(vocabulary))
        images.append({"id": n, "file_name": f"{sample.stem}{cfg.image_suffix}", "height": label.shape[0],
                       "width": label.shape[1]})
        annotations.append({"image_id": n, "file_name": f"{sample.stem}.png", "segments_info": segments})
        stems.append(sample.stem)
    atomic_write_json(out / "panoptic.json", {"images": images, "annotations": annotations,
                                              "categories": categories}, indent=None)
    return _finish(cfg, out, vocabulary, out / "panoptic.json", out / "panoptic", stems, cfg.image_suffix, pixels,
                   semantic_root=Path(cfg.label_root))


def _finish(cfg: LabelledSetConfig, out: Path, vocabulary: Vocabulary, panoptic_json: Path, panoptic_root: Path,
            stems: list[str], suffix: str, pixels: np.ndarray, semantic_root: Path | None = None) -> LabelledSet:
    # Our vocabulary file, so both evaluations (and the text embeddings) read exactly these classes in this order.
    vocabulary.to_json(out / "vocabulary.json")
    atomic_write_text(out / "split.txt", "".join(f"{s}\n" for s in stems))
    labelled = LabelledSet(vocabulary=vocabulary, vocabulary_file=out / "vocabulary.json", panoptic_json=panoptic_json,
                           panoptic_root=panoptic_root, image_root=Path(cfg.image_root),
                           semantic_root=semantic_root or out / "semantic", split_file=out / "split.txt",
                           image_suffix=suffix, stems=stems, class_pixels=pixels)
    missing = labelled.unlabelled_classes
    if missing:
        logger.warning("the report set (%d images) has no labels for %d class(es) of vocabulary %r: %s; their IoU and "
                       "accuracy are not defined", len(stems), len(missing), vocabulary.name, ", ".join(missing))
    return labelled


def prepare_labelled_set(cfg: LabelledSetConfig, out_dir: str | Path) -> LabelledSet:
    """Write both forms of the set of ``cfg`` under ``out_dir`` and return them (see the module docstring).

    Logs a warning listing the vocabulary's classes that have no label in the set."""
    cfg.validate()
    cfg.check_paths()
    out = Path(out_dir)
    if cfg.kind == "panoptic":
        return _from_panoptic(cfg, out)
    return _from_semantic(cfg, out)
