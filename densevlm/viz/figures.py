"""Matplotlib figures written atomically as PNG (Agg backend, no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from densevlm.utils.io import atomic_path  # noqa: E402


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, vocabulary: Any, kind: str, path: str | Path) -> Path:
    """Row-normalised confusion matrix over the classes of one kind ('thing' or 'stuff')."""
    want_thing = kind == "thing"
    idx = [i for i, c in enumerate(vocabulary.classes) if c.isthing == want_thing]
    sub = cm[np.ix_(idx, idx)].astype(float)
    rows = sub.sum(1, keepdims=True)
    norm = np.divide(sub, rows, out=np.zeros_like(sub), where=rows > 0)
    names = [vocabulary.classes[i].name + (" *" if vocabulary.classes[i].novel else "") for i in idx]
    n = len(idx)
    fig, ax = plt.subplots(figsize=(0.45 * n + 2.5, 0.45 * n + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for r in range(n):
        for c in range(n):
            if sub[r, c] > 0:
                ax.text(c, r, f"{norm[r, c]:.2f}".lstrip("0"), ha="center", va="center", fontsize=6,
                        color="white" if norm[r, c] > 0.5 else "black")
    acc = np.trace(sub) / max(1.0, sub.sum()) * 100
    ax.set_title(f"zero-shot largest {kind}: top-1 {acc:.1f}% (rows: truth, * novel)")
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    fig.colorbar(im, ax=ax, fraction=0.04)
    return save_figure(fig, path)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: str | Path, cols: int = 4,
               wrap: int = 38) -> Path:
    """A contact sheet of RGB images (H×W×3 uint8) with wrapped titles."""
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, title in zip(np.atleast_1d(axes).ravel(), images, titles):
        ax.imshow(img)
        ax.set_title("\n".join(textwrap.wrap(title, wrap)), fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
