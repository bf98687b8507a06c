"""The page of the proof-of-concept report: its figures (PNG) and one HTML file that opens from disk.

Everything here draws or formats numbers computed elsewhere (:mod:`densevlm.evaluation.poc_report`); the foreground
bias figure is the diagnostics' own (:func:`~densevlm.evaluation.diagnostics.plot_foreground_bias`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from densevlm.evaluation.semseg_figures import class_palette, colourise
from densevlm.utils.io import atomic_write_text
from densevlm.viz.figures import plt, save_figure

MODEL_COLOURS = ("#7f8c8d", "#2e86c1", "#27ae60", "#c0392b", "#8e44ad", "#d68910", "#16a085", "#34495e")


def plot_grouped_bars(values: Mapping[str, Sequence[Optional[float]]], names: Sequence[str], path: str | Path, *,
                      xlabel: str, title: str,
                      xlim: Optional[tuple[float, float]] = (0.0, 100.0)) -> Path:
    """Horizontal bars, one group per name (row) and one bar per model (``values``: label -> a value per name,
    None where undefined); ``xlim`` None fits the axis to the values (changes, which may be negative)."""
    labels = list(values)
    n, k = len(names), max(1, len(labels))
    height = 0.8 / k
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.2 * n * max(1.5, k * 0.6)))
    for j, label in enumerate(labels):
        ys = np.arange(n) + (j - (k - 1) / 2) * height
        xs = [v if v is not None else 0.0 for v in values[label]]
        ax.barh(ys, xs, height=height * 0.95, color=MODEL_COLOURS[j % len(MODEL_COLOURS)], label=label)
    ax.set_yticks(range(n), list(names), fontsize=7)
    ax.invert_yaxis()
    if xlim is not None:
        ax.set_xlim(*xlim)
    else:
        ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_image_rows(rows: Sequence[Mapping[str, Any]], model_labels: Sequence[str], class_names: Sequence[str],
                    path: str | Path, *, alpha: float = 0.6) -> Path:
    """One row per image: the image, its truth and every model's prediction blended over it, with a legend.

    ``rows``: dicts with ``image`` (H, W, 3) uint8, ``label`` (H, W), ``preds`` (label -> (H, W)) and ``title``.
    """
    palette = class_palette(len(class_names))
    cols = 2 + len(model_labels)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.6 * cols + 1.4, 2.7 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        image = np.asarray(row["image"], dtype=np.float32)
        label = np.asarray(row["label"])
        valid = (label >= 0) & (label < len(class_names))
        panels = [("image", None), ("truth", label)] + [(m, np.asarray(row["preds"][m])) for m in model_labels]
        present: set[int] = set(np.unique(label[valid]).tolist())
        for ax, (title, data) in zip(ax_row, panels):
            ax.axis("off")
            if data is None:
                ax.imshow(image.astype(np.uint8))
                ax.set_title(row["title"], fontsize=7)
                continue
            if title != "truth":
                acc = float((data[valid] == label[valid]).mean() * 100) if valid.any() else float("nan")
                title = f"{title} ({acc:.0f}% px)"
                present |= set(np.unique(data).tolist())
            blend = (1 - alpha) * image + alpha * colourise(data, palette).astype(np.float32)
            ax.imshow(blend.clip(0, 255).astype(np.uint8))
            ax.set_title(title, fontsize=7)
        shown = [c for c in sorted(present) if 0 <= c < len(class_names)][:14]
        handles = [plt.Rectangle((0, 0), 1, 1, color=palette[c] / 255.0) for c in shown]
        ax_row[-1].legend(handles, [class_names[c] for c in shown], fontsize=6, loc="center left",
                          bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------- HTML


def _cell(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "<td class='na'>-</td>"
    if isinstance(value, float):
        return f"<td>{value:.{digits}f}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, digits: int = 1) -> str:
    """An HTML table; floats with ``digits`` decimals, None as '-'."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v, digits) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}th,td{border:1px solid #ccc;padding:2px 7px;
text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}td.na{color:#aaa}
.warn{background:#fff3cd;border:1px solid #e0c36b;padding:.5em 1em}img{max-width:100%}code{background:#f4f4f4}
h2{border-bottom:1px solid #ddd;margin-top:1.6em}"""


def write_html(path: str | Path, title: str, sections: Sequence[tuple[str, str]], *, intro: str = "") -> Path:
    """One self-contained page: ``sections`` are (heading, HTML body) pairs; images are relative paths."""
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}\n" for h, b in sections)
    page = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{intro}\n{body}</body></html>\n")
    atomic_write_text(path, page)
    return Path(path)
