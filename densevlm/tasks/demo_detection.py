"""``densevlm demo detection``: the demo's detection column, a separate timed stage.

The same toy detector recipe (``DemoConfig.detection``, ``configs/det/toy.yaml``) is trained on the demo world's
base (seen) classes on three frozen backbones that differ only in their weights: the base student (zoo
``toy-student``), its CLIPSelf tuning and its DenseVLM tuning (the demo's stages 3 and 4, reused when finished).
Each is evaluated on toy val over every class: AP, AP50 and AP50 over novel / base classes (COCOEvaluator).
Writes ``detection/<backbone>/`` (detector runs), ``detection/summary.json``, ``figures/detection_ap50.png`` and adds
``detection`` to the demo's ``summary.json``. A backbone's detector is reused on a re-run when its config and the
backbone's weights are unchanged.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

from densevlm.config import to_dict
from densevlm.config.demo import DemoConfig
from densevlm.utils.io import atomic_write_json, read_json

BACKBONES = ("base", "clipself", "densevlm")


def _backbones(cfg: DemoConfig, fresh: bool, from_scratch: bool) -> tuple[Path, dict[str, str]]:
    """The demo world and the three backbones (zoo name or run directory), running the demo stages they need."""
    from densevlm.tasks.demo import align_configs, models_stage, train_stage, world_stage
    from densevlm.tasks.align import run_align

    world = world_stage(cfg, fresh)
    specs = models_stage(cfg, from_scratch)
    clip_cfg, dense_cfg = align_configs(cfg, world, specs)
    train_stage("[3] CLIPSelf (student)", clip_cfg, run_align, fresh)
    train_stage("[4] DenseVLM (student)", dense_cfg, run_align, fresh)
    student = specs["student"].pretrained or specs["student"].name
    return world, {"base": student, "clipself": clip_cfg.output_dir, "densevlm": dense_cfg.output_dir}


def _weights_id(model: str) -> str:
    from densevlm.models import create_backbone
    from densevlm.models.model_arg import spec_from_model_arg

    return create_backbone(spec_from_model_arg(model)).weights_id


def plot_detection(rows: dict[str, dict[str, float]], path: Path) -> Path:
    """Grouped bars: AP50 over all, novel and base classes per backbone."""
    import numpy as np

    from densevlm.viz.figures import plt, save_figure

    keys = ("AP50", "AP50-novel", "AP50-base")
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    x = np.arange(len(keys))
    width = 0.8 / max(1, len(rows))
    for i, (name, metrics) in enumerate(rows.items()):
        values = [metrics.get(k, float("nan")) for k in keys]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, keys)
    ax.set_ylabel("%")
    ax.set_title("open-vocabulary detection on toy val (same detector, frozen backbone differs)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def detect_with(cfg: DemoConfig, name: str, model: str, world: Path, fresh: bool = False) -> dict[str, Any]:
    """Train and evaluate the demo's detector on one backbone, or reuse its result (same config and weights)."""
    from densevlm.integrations.detectron2.detector import RESULT_FILE, run_detection

    dcfg = copy.deepcopy(cfg.detection)
    dcfg.output_dir = str(Path(cfg.output_dir) / "detection" / name)
    dcfg.backbone.model = model
    dcfg.data.root = str(world)
    weights_id = _weights_id(model)
    saved = Path(dcfg.output_dir) / RESULT_FILE
    if not fresh and saved.is_file():
        old = read_json(saved)
        if old.get("config") == to_dict(dcfg) and old.get("backbone_weights_id") == weights_id:
            print(f"[7] detection ({name}): reusing {dcfg.output_dir}")
            return old
    started = time.time()
    result = run_detection(dcfg, "train")
    result["backbone_weights_id"] = weights_id
    atomic_write_json(saved, result)
    print(f"[7] detection ({name}): {result['max_iter']} iterations + evaluation in {time.time() - started:.0f}s "
          f"-> {dcfg.output_dir}")
    return result


def run_detection_stage(cfg: DemoConfig, *, fresh: bool = False, from_scratch: bool = False) -> dict[str, Any]:
    """Train and evaluate the toy detector on each backbone; the table, the figure and the summaries."""
    from densevlm.integrations.detectron2.detector import format_table

    t0 = time.time()
    out = Path(cfg.output_dir)
    world, backbones = _backbones(cfg, fresh, from_scratch)
    rows = {name: detect_with(cfg, name, backbones[name], world, fresh) for name in BACKBONES}
    metrics = {name: r["metrics"] for name, r in rows.items()}
    seconds = round(time.time() - t0, 1)
    summary = {
        "metrics": {n: {k: m.get(k) for k in ("AP", "AP50", "AP50-novel", "AP50-base", "AP-novel", "AP-base")}
                    for n, m in metrics.items()},
        "train_seconds": {n: r.get("train_seconds") for n, r in rows.items()},
        "novel_classes": next(iter(rows.values())).get("novel_classes", []),
        "seconds": seconds,
    }
    atomic_write_json(out / "detection" / "summary.json", summary)
    plot_detection(metrics, out / "figures" / "detection_ap50.png")
    demo_summary = out / "summary.json"
    if demo_summary.is_file():  # the detection column beside the region and segmentation ones
        atomic_write_json(demo_summary, {**read_json(demo_summary), "detection": summary})
    print("\n[7] " + format_table(metrics, title="open-vocabulary detection on toy val (%; detector trained on seen "
                                                 "classes only, every class scored; novel = never trained on)"))
    print(f"detection stage finished in {seconds:.0f}s; figure: {out / 'figures' / 'detection_ap50.png'}")
    return summary
