"""``densevlm demo``: the whole pipeline on the toy world, on a CPU, in minutes.

Stages (each reused on a re-run when its outputs exist and its config is unchanged):
1. generate the toy world;
2. contrastively pre-train the tiny CLIP on its captions, and report image-level zero-shot quality;
3. figures: a contact sheet of toy images with captions and panoptic overlays, zero-shot confusion matrices.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from densevlm.config import to_dict
from densevlm.config.demo import DemoConfig
from densevlm.engine.run_dir import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE
from densevlm.utils.io import atomic_write_json, read_json

log = logging.getLogger(__name__)


def _stage_done(run_dir: Path, cfg: Any) -> bool:
    """A training stage is reusable when it finished (weights + metrics) with exactly this config."""
    saved = run_dir / CONFIG_FILE
    if not ((run_dir / WEIGHTS_FILE).is_file() and (run_dir / METRICS_FILE).is_file() and saved.is_file()):
        return False
    return yaml.safe_load(saved.read_text()) == to_dict(cfg)


def world_stage(cfg: DemoConfig, fresh: bool) -> Path:
    from densevlm.toyworld import generate_world

    root = Path(cfg.output_dir) / "toyworld"
    world_file = root / "world.json"
    if world_file.is_file() and not fresh and read_json(world_file)["config"] == to_dict(cfg.world):
        print(f"[1] toy world: reusing {root}")
        return root
    t0 = time.time()
    generate_world(cfg.world, root, overwrite=True)
    print(f"[1] toy world: {cfg.world.num_train} train + {cfg.world.num_val} val images in {time.time() - t0:.1f}s "
          f"-> {root}")
    return root


def pretrain_config(cfg: DemoConfig, world: Path) -> Any:
    pcfg = copy.deepcopy(cfg.pretrain)
    pcfg.output_dir = str(Path(cfg.output_dir) / "pretrain")
    pcfg.data.captions_json = str(world / "annotations" / "captions_train.json")
    pcfg.data.image_root = str(world / "images" / "train")
    pcfg.eval.panoptic_json = str(world / "annotations" / "panoptic_val.json")
    pcfg.eval.image_root = str(world / "images" / "val")
    pcfg.eval.vocabulary = str(world)
    return pcfg


def pretrain_stage(cfg: DemoConfig, world: Path, fresh: bool) -> dict[str, Any]:
    from densevlm.engine.pretrain import run_pretrain

    pcfg = pretrain_config(cfg, world)
    run_dir = Path(pcfg.output_dir)
    if not fresh and _stage_done(run_dir, pcfg):
        print(f"[2] pre-training: reusing {run_dir}")
        return read_json(run_dir / METRICS_FILE)
    t0 = time.time()
    result = run_pretrain(pcfg, overwrite=True)
    print(f"[2] pre-training: {result.global_step} steps in {time.time() - t0:.0f}s -> {run_dir}")
    return result.metrics


def world_figure(world: Path, out: Path, n: int) -> Path:
    """Toy val images beside their panoptic overlays, titled with one caption each."""
    from densevlm.viz.figures import image_grid

    captions = read_json(world / "annotations" / "captions_val.json")
    panoptic = read_json(world / "annotations" / "panoptic_val.json")
    first_caption: dict[int, str] = {}
    for ann in captions["annotations"]:
        first_caption.setdefault(ann["image_id"], ann["caption"])
    cats = {c["id"]: c for c in panoptic["categories"]}
    images, titles = [], []
    rng = np.random.default_rng(0)
    for img_info, ann in list(zip(panoptic["images"], panoptic["annotations"]))[:n]:
        img = np.asarray(Image.open(world / "images" / "val" / img_info["file_name"]).convert("RGB"))
        pan = np.asarray(Image.open(world / "annotations" / "panoptic_val" / ann["file_name"]).convert("RGB"),
                         dtype=np.int64)
        ids = pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2]
        overlay = img.astype(float).copy()
        labels = []
        for seg in ann["segments_info"]:
            colour = rng.integers(0, 255, 3)
            mask = ids == seg["id"]
            overlay[mask] = 0.45 * overlay[mask] + 0.55 * colour
            labels.append(cats[seg["category_id"]]["name"])
        images += [img, overlay.astype(np.uint8)]
        titles += [first_caption.get(img_info["id"], ""), "panoptic: " + ", ".join(sorted(set(labels)))]
    return image_grid(images, titles, out, cols=4)


def run_demo(cfg: DemoConfig, *, fresh: bool = False) -> dict[str, Any]:
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = world_stage(cfg, fresh)
    pre = pretrain_stage(cfg, world, fresh)
    figures = out / "figures"
    world_figure(world, figures / "toyworld_val.png", cfg.grid_images)
    zs = pre.get("final", {})
    summary = {"pretrain": zs, "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "summary.json", summary)
    print("\n[3] image-level zero-shot on toy val (prompt-ensembled text embeddings):")
    for key in ("zeroshot.thing.top1", "zeroshot.stuff.top1", "zeroshot.thing.top1.seen",
                "zeroshot.thing.top1.novel", "zeroshot.stuff.top1.seen", "zeroshot.stuff.top1.novel"):
        if key in zs:
            print(f"    {key:28s} {zs[key]:6.2f}")
    print(f"figures in {figures} and {Path(cfg.output_dir) / 'pretrain' / 'figures'}; "
          f"TensorBoard: tensorboard --logdir {cfg.output_dir}")
    print(f"demo finished in {time.time() - t0:.0f}s")
    return summary
