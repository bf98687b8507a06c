"""Detection figures: AP50 per class with the novel classes marked (PNG, written atomically)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from densevlm.viz.figures import plt, save_figure


def plot_ap50_per_class(metrics: Mapping[str, float], novel: Sequence[str], path: str | Path, *,
                        title: str = "") -> Path:
    """Horizontal bars of ``AP50-<class>`` (classes with ground truth, sorted), novel classes in orange, with the
    novel and base means as dashed lines."""
    novel_set = set(novel)
    rows = sorted(((k[len("AP50-"):], v) for k, v in metrics.items()
                   if k.startswith("AP50-") and k not in ("AP50-novel", "AP50-base") and not math.isnan(v)),
                  key=lambda r: r[1])
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.18 * max(1, len(rows))))
    ax.barh(range(len(rows)), [v for _, v in rows],
            color=["#e67e22" if n in novel_set else "#2e86c1" for n, _ in rows])
    ax.set_yticks(range(len(rows)), [n + (" *" if n in novel_set else "") for n, _ in rows], fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP50 (%)")
    for key, colour in (("AP50-novel", "#e67e22"), ("AP50-base", "#2e86c1")):
        if not math.isnan(metrics.get(key, float("nan"))):
            ax.axvline(metrics[key], color=colour, lw=1.0, ls="--")
    summary = ", ".join(f"{k} {metrics.get(k, float('nan')):.1f}" for k in ("AP50", "AP50-novel", "AP50-base"))
    ax.set_title((title + "\n" if title else "") + summary + " (* novel)", fontsize=9)
    return save_figure(fig, path)
