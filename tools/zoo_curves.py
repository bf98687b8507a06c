#!/usr/bin/env python
"""Learning curves of the zoo models: image-level zero-shot (largest thing / largest stuff) and the training
loss against epochs, from the curves recorded in the zoo manifest (or in any pre-training run's metrics.json).

Draws one PNG and prints one JSON object (the points plotted and the quality bars of the zoo issue), so anyone
can see whether a recipe had converged and how far it is from its bar.

    python tools/zoo_curves.py --out runs/zoo_curves.png
    python tools/zoo_curves.py --run runs/zoo/pretrain_student --run runs/zoo/pretrain_teacher --out curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densevlm.zoo import list_models  # noqa: E402

#: image-level zero-shot bars (thing, stuff) per zoo model, from the zoo issue.
BARS = {"toy-student": (40.0, 85.0), "toy-teacher": (60.0, 90.0)}


def curve_from_metrics(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"epoch": h["epoch"], "step": h["step"], "loss": h.get("train", {}).get("loss"), **h.get("eval", {})}
            for h in metrics.get("history", [])]


def collect(runs: list[str]) -> dict[str, list[dict[str, Any]]]:
    if runs:
        return {Path(r).name: curve_from_metrics(json.loads((Path(r) / "metrics.json").read_text())) for r in runs}
    # pre-trained entries only: a CLIPSelf stage's curve has region metrics and a cosine loss
    return {e.name: e.info["curve"] for e in list_models()
            if any("zeroshot.thing.top1" in p for p in e.info.get("curve", []))}


def plot(curves: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from densevlm.viz.figures import save_figure

    fig, (ax_zs, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, points) in enumerate(curves.items()):
        colour = f"C{i}"
        for key, style in (("zeroshot.thing.top1", "-o"), ("zeroshot.stuff.top1", "--s")):
            xs = [p["epoch"] for p in points if p.get(key) is not None]
            ys = [p[key] for p in points if p.get(key) is not None]
            if xs:
                ax_zs.plot(xs, ys, style, color=colour, label=f"{name}: {key.split('.')[1]}")
        for bar, style in zip(BARS.get(name, ()), (":", "-.")):
            ax_zs.axhline(bar, color=colour, linestyle=style, linewidth=0.8, alpha=0.6)
        xs = [p["epoch"] for p in points if p.get("loss") is not None]
        ax_loss.plot(xs, [p["loss"] for p in points if p.get("loss") is not None], color=colour, label=name)
    ax_zs.set(xlabel="epoch", ylabel="top-1 (%)", title="image-level zero-shot on toy val (dotted: bars)")
    ax_loss.set(xlabel="epoch", ylabel="contrastive loss", title="training loss (epoch mean)")
    for ax in (ax_zs, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="a pre-training run directory (repeatable); "
                        "default: the curves in the zoo manifest")
    parser.add_argument("--out", default="runs/zoo_curves.png", help="PNG to write")
    args = parser.parse_args()
    curves = collect(args.run)
    if not curves:
        print("no curves: the zoo manifest has none and no --run was given", file=sys.stderr)
        return 1
    path = plot(curves, Path(args.out))
    print(json.dumps({"figure": str(path), "bars": BARS, "curves": {
        name: [{k: v for k, v in p.items() if k in ("epoch", "step", "loss", "zeroshot.thing.top1",
                                                     "zeroshot.stuff.top1")} for p in points]
        for name, points in curves.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
