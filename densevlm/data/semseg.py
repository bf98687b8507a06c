"""Semantic-segmentation splits in the detectron2 / mmseg layout: an image folder and a folder of label PNGs.

A label PNG holds one class index per pixel (0..C-1, in the vocabulary's order) and ``ignore_label`` (255) where
nothing is scored; palette PNGs (Pascal VOC) are read as their indices. Every check names the file at fault:
a missing label, an image and label of different sizes, a label value that is neither a class nor the ignore
label. With ``on_bad_sample: skip`` such an image is left out with a warning and counted instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from densevlm.config.semseg import SemSegDataConfig
from densevlm.data.images import ImageReadError, load_rgb
from densevlm.data.transforms import to_tensor

logger = logging.getLogger(__name__)


class SemSegDataError(ValueError):
    """A split is inconsistent (missing label, size mismatch, label value outside the classes); names the file."""


@dataclass(frozen=True)
class SemSegSample:
    """One image of a split: its stem (path below the roots, without suffix) and both files."""

    stem: str
    image: Path
    label: Path


def list_samples(cfg: SemSegDataConfig) -> tuple[list[SemSegSample], list[SemSegSample]]:
    """(pairs to evaluate, images without a label): the split in stem order (or ``split_file`` order).

    Raises SemSegDataError naming the files when an image has no label (unless ``on_bad_sample`` is "skip",
    then they are returned apart with a warning), FileNotFoundError when a root or the split file is missing.
    """
    cfg.check_paths()
    image_root, label_root = Path(cfg.image_root), Path(cfg.label_root)
    for key, root in (("image_root", image_root), ("label_root", label_root)):
        if not root.is_dir():
            raise FileNotFoundError(f"data.{key}: folder not found: {root}")
    if cfg.split_file:
        split = Path(cfg.split_file)
        if not split.is_file():
            raise FileNotFoundError(f"data.split_file: not found: {split}")
        stems = [line.strip() for line in split.read_text().splitlines() if line.strip()]
        missing_images = [s for s in stems if not (image_root / f"{s}{cfg.image_suffix}").is_file()]
        if missing_images:
            raise SemSegDataError(
                f"{split}: {len(missing_images)} listed image(s) not found under {image_root} with suffix "
                f"{cfg.image_suffix!r}, e.g. {image_root / (missing_images[0] + cfg.image_suffix)}"
            )
    else:
        stems = sorted(
            os.path.relpath(os.path.join(d, f), image_root)[: -len(cfg.image_suffix)]
            for d, _, files in os.walk(image_root) for f in files if f.endswith(cfg.image_suffix)
        )
        if not stems:
            raise SemSegDataError(f"data.image_root: no '*{cfg.image_suffix}' image under {image_root}")
    samples, missing = [], []
    for s in stems:
        sample = SemSegSample(s, image_root / f"{s}{cfg.image_suffix}", label_root / f"{s}{cfg.label_suffix}")
        (samples if sample.label.is_file() else missing).append(sample)
    if missing:
        msg = (f"{len(missing)} of {len(stems)} image(s) have no label PNG, e.g. {missing[0].image} has no "
               f"{missing[0].label}")
        if cfg.on_bad_sample == "error":
            raise SemSegDataError(msg + " (data.on_bad_sample=skip leaves such images out)")
        logger.warning("%s; skipped", msg)
    if cfg.max_images is not None:
        samples = samples[: cfg.max_images]
    return samples, missing


def read_label(path: str | Path, *, reduce_zero_label: bool = False, ignore_label: int = 255) -> np.ndarray:
    """A label PNG as an (H, W) int64 array of class indices (palette PNGs give their indices)."""
    p = Path(path)
    try:
        with Image.open(p) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise SemSegDataError(f"{p}: label PNG has mode {img.mode}, expected a single-channel image of class "
                                      "indices (mode L, P or I)")
            label = np.array(img, dtype=np.int64)
    except FileNotFoundError:
        raise SemSegDataError(f"label PNG not found: {p}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise SemSegDataError(f"cannot read label PNG {p}: {err}") from None
    if reduce_zero_label:
        keep = (label != 0) & (label != ignore_label)
        label = np.where(keep, label - 1, ignore_label)
    return label


def check_label(label: np.ndarray, num_classes: int, ignore_label: int, path: Path | str) -> None:
    """Raise SemSegDataError naming the file and the values when a label is neither a class nor ``ignore_label``."""
    bad = (label < 0) | ((label >= num_classes) & (label != ignore_label))
    if bad.any():
        values = np.unique(label[bad])
        raise SemSegDataError(
            f"{path}: label value(s) {values[:10].tolist()} ({int(bad.sum())} pixels) are not classes of the "
            f"vocabulary (0..{num_classes - 1}) nor the ignore label {ignore_label}"
        )


def resize_short_side(size: tuple[int, int], short_side: Optional[int], max_long_side: Optional[int]) -> tuple[int, int]:
    """(H, W) after mmseg's keep-ratio rescale: short side to ``short_side``, long side at most ``max_long_side``."""
    h, w = size
    if short_side is None and max_long_side is None:
        return h, w
    scale = min(short_side / min(h, w) if short_side else float("inf"),
                max_long_side / max(h, w) if max_long_side else float("inf"))
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


class SemSegDataset(torch.utils.data.Dataset):
    """Images resized for inference and labels at their own size.

    Item: ``image`` (3, h, w) normalised float tensor at the inference size, ``label`` (H, W) int64 numpy array at
    the label's size, ``file_name``, ``label_file``, ``index``; or, for a bad sample under ``on_bad_sample:
    skip``, ``{"skipped": reason, "file_name": ..., "index": ...}``.

    Args:
        cfg: the split.
        num_classes: classes of the vocabulary; labels are checked against it (and ``cfg.num_classes``
            against it when set).
        image_mean, image_std: the segmenter's normalisation.
        short_side, max_long_side: the inference resize (see :class:`SemSegInferenceConfig`).
        samples: the pairs (default: :func:`list_samples` of ``cfg``; its images without label are kept in
            ``missing_labels``).
    """

    def __init__(self, cfg: SemSegDataConfig, num_classes: int, image_mean: Sequence[float],
                 image_std: Sequence[float], *, short_side: Optional[int] = None,
                 max_long_side: Optional[int] = None, samples: Optional[list[SemSegSample]] = None) -> None:
        if cfg.num_classes is not None and cfg.num_classes != num_classes:
            raise SemSegDataError(
                f"the vocabulary has {num_classes} classes, the dataset (data.num_classes, labels under "
                f"{cfg.label_root}) has {cfg.num_classes}; choose the vocabulary of this dataset"
            )
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.short_side, self.max_long_side = short_side, max_long_side
        if samples is None:
            samples, self.missing_labels = list_samples(cfg)
        else:
            self.missing_labels = []
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        label = read_label(sample.label, reduce_zero_label=self.cfg.reduce_zero_label,
                           ignore_label=self.cfg.ignore_label)
        check_label(label, self.num_classes, self.cfg.ignore_label, sample.label)
        return label

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            label = self.load_label(index)
            img = load_rgb(sample.image)
            if (img.height, img.width) != label.shape:
                raise SemSegDataError(
                    f"{sample.image} is {img.width}x{img.height} (WxH) but its label {sample.label} is "
                    f"{label.shape[1]}x{label.shape[0]}"
                )
        except (SemSegDataError, ImageReadError) as err:
            if self.cfg.on_bad_sample == "error":
                raise
            logger.warning("skipping %s: %s", sample.image, err)
            return {"skipped": str(err), "file_name": str(sample.image), "index": index}
        image = to_tensor(img, self.image_mean, self.image_std)
        size = resize_short_side(label.shape, self.short_side, self.max_long_side)
        if size != label.shape:
            # On the float tensor without antialiasing: what mmseg's cv2 bilinear resize does.
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return {"image": image, "label": label, "file_name": str(sample.image), "label_file": str(sample.label),
                "index": index}


def collate_semseg(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep a batch as a list: images differ in size."""
    return items


def semseg_loader(dataset: SemSegDataset, indices: Sequence[int], num_workers: int,
                  batch_size: int = 1) -> torch.utils.data.DataLoader:
    """Ordered loader over ``indices`` of ``dataset`` (one process's shard)."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate_semseg, persistent_workers=False)
