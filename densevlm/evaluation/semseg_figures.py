"""Figures of semantic-segmentation results: per-class IoU bars and prediction overlays (image, truth, prediction)."""

from __future__ import annotations

import colorsys
import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from densevlm.utils.io import atomic_write_text
from densevlm.viz.figures import plt, save_figure

IGNORE_COLOUR = (0, 0, 0)


def class_palette(num_classes: int) -> np.ndarray:
    """(num_classes + 1, 3) uint8 colours, well spread in hue (golden-ratio steps); the last row is black for the
    ignore label."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.45 + 0.15 * ((i // 7) % 2)
        colours.append([int(255 * c) for c in colorsys.hls_to_rgb(hue, light, 0.75)])
    colours.append(list(IGNORE_COLOUR))
    return np.asarray(colours, dtype=np.uint8)


def colourise(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices (anything outside the classes as ignore) -> (H, W, 3) uint8."""
    n = len(palette) - 1
    idx = np.where((label >= 0) & (label < n), label, n)
    return palette[idx]


def plot_class_iou(result: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Horizontal bars of per-class IoU (classes with ground truth, sorted), novel classes in orange."""
    rows = [r for r in result["per_class"] if r.get("IoU") is not None and not np.isnan(r["IoU"])]
    rows.sort(key=lambda r: r["IoU"])
    n = max(1, len(rows))
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.18 * n))
    colours = ["#e67e22" if r.get("novel") else "#2e86c1" for r in rows]
    ax.barh(range(len(rows)), [r["IoU"] for r in rows], color=colours)
    ax.set_yticks(range(len(rows)), [r["name"] + (" *" if r.get("novel") else "") for r in rows], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    metrics = result["metrics"]
    summary = f"mIoU {metrics['mIoU']:.1f}"
    for key in ("mIoU.seen", "mIoU.novel"):
        if key in metrics:
            summary += f", {key.split('.')[1]} {metrics[key]:.1f}"
    ax.set_title((title + ": " if title else "") + summary + (" (* novel)" if "mIoU.novel" in metrics else ""),
                 fontsize=9)
    ax.axvline(metrics["mIoU"], color="black", lw=0.8, ls="--")
    return save_figure(fig, path)


def plot_overlays(samples: Sequence[Mapping[str, Any]], class_names: Sequence[str], path: str | Path, *,
                  alpha: float = 0.55) -> Path:
    """One row per sample: the image, the ground truth and the prediction, both blended over the image.

    ``samples``: dicts with ``image`` (H, W, 3) uint8, ``label`` and ``pred`` (H, W) class indices, ``name``.
    A legend names the classes present in the truth or the prediction of each row.
    """
    palette = class_palette(len(class_names))
    fig, axes = plt.subplots(len(samples), 3, figsize=(11, 3.3 * len(samples)), squeeze=False)
    for row, sample in zip(axes, samples):
        image = np.asarray(sample["image"], dtype=np.float32)
        label, pred = np.asarray(sample["label"]), np.asarray(sample["pred"])
        valid = (label >= 0) & (label < len(class_names))
        acc = float((pred[valid] == label[valid]).mean() * 100) if valid.any() else float("nan")
        panels = [(image, sample.get("name", "")), (label, "ground truth"), (pred, f"prediction (pixel acc {acc:.0f}%)")]
        for ax, (data, title) in zip(row, panels):
            ax.axis("off")
            ax.set_title(title, fontsize=8)
            if data is image:
                ax.imshow(image.astype(np.uint8))
                continue
            blend = (1 - alpha) * image + alpha * colourise(data, palette).astype(np.float32)
            ax.imshow(blend.clip(0, 255).astype(np.uint8))
        present = sorted(set(np.unique(label[valid]).tolist()) | set(np.unique(pred).tolist()))
        present = [c for c in present if 0 <= c < len(class_names)][:12]
        handles = [plt.Rectangle((0, 0), 1, 1, color=palette[c] / 255.0) for c in present]
        row[2].legend(handles, [class_names[c] for c in present], fontsize=6, loc="center left",
                      bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def per_class_csv(result: Mapping[str, Any]) -> str:
    """The per-class rows of a result as CSV (name, novel, IoU, ACC, ground-truth and predicted pixels)."""
    buf = io.StringIO()
    fields = ["index", "name", "isthing", "novel", "IoU", "ACC", "gt_pixels", "pred_pixels"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in result["per_class"]:
        writer.writerow({k: (f"{row[k]:.4f}" if isinstance(row.get(k), float) else row.get(k)) for k in fields})
    return buf.getvalue()


def write_semseg_figures(result: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                         output_dir: str | Path) -> dict[str, Path]:
    """``class_iou.png``, ``overlays.png`` (when ``samples``) and ``per_class.csv`` in ``output_dir``."""
    out = Path(output_dir)
    paths = {"class_iou": plot_class_iou(result, out / "class_iou.png", title=result.get("model", {}).get("name", ""))}
    if samples:
        paths["overlays"] = plot_overlays(samples, class_names, out / "overlays.png")
    atomic_write_text(out / "per_class.csv", per_class_csv(result))
    paths["per_class"] = out / "per_class.csv"
    return paths
