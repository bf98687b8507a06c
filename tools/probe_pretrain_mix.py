#!/usr/bin/env python
"""Choose the web-like pre-training mix (issue 20, design decision 1) on pre-training probes.

For each object-centric share: make a world from ``--world-recipe`` with that share (by default the train split
is held at ``--train-images`` images, scenes plus close-ups, so every share sees as many images and optimiser
steps), pre-train a CLIP on its captions with ``densevlm pretrain`` (``--recipe`` plus ``--set`` overrides, in a
subprocess), then measure what the issue chooses on:

* image-level zero-shot on the world's val split (the recipe's own eval: largest thing / largest stuff);
* the crop ceiling of toy-val thing boxes (``tools/probe_region_ceiling.py``: each thing box cut from the
  ``--eval-image-size`` canvas, ``--context`` times its size, classified by the image tower), beside the dense
  ``rois.thing`` of the same boxes.

Val is scenes only and the same images for every share (close-ups have their own random stream and go to train
only), so the rows compare like with like. Prints one JSON object and writes it to ``<out>/probe_pretrain_mix.json``.

    # the real probe (GPU machine): the zoo student recipe on the zoo v2 world's statistics
    python tools/probe_pretrain_mix.py --shares 0 0.15 0.3 0.5 --out runs/probe_mix
    # a CPU dry run: tiny world, 2-block towers, one short epoch
    python tools/probe_pretrain_mix.py --shares 0 0.5 --out /tmp/probe_mix --train-images 64 --num-val 16 \\
        --world-set image_size=64 --threads 2 --set loop.epochs=1 loop.batch_size=16 loop.num_workers=0 \\
        'model.model_overrides={"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}, \\
        "text_cfg": {"layers": 1, "width": 32, "heads": 1}}' data.image_size=64
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tools"))


def world_config(recipe: str, share: float, train_images: int | None, num_val: int | None, extra: list[str]):
    """The world of one share: the recipe with the share set, and num_train (scenes) chosen so that scenes plus
    close-ups make ``train_images`` (when given)."""
    from densevlm.config import load_config
    from densevlm.config.toyworld import ToyWorldConfig

    overrides = [f"object_centric_share={share}", *extra]
    if num_val is not None:
        overrides.append(f"num_val={num_val}")
    if train_images is not None:
        overrides.append(f"num_train={int(round(train_images * (1.0 - share)))}")
    return load_config(ToyWorldConfig, recipe, overrides)


def make_world(cfg: Any, root: Path) -> None:
    """Generate the world unless ``root`` already holds one with exactly this config."""
    from densevlm.config.core import to_dict
    from densevlm.toyworld import generate_world

    world_file = root / "world.json"
    if world_file.is_file() and json.loads(world_file.read_text())["config"] == to_dict(cfg):
        return
    generate_world(cfg, root, overwrite=True, progress=False)


def pretrain(recipe: str, world: Path, run_dir: Path, sets: list[str], threads: int | None) -> dict[str, Any]:
    """``densevlm pretrain`` on the world's train captions with the world's val as its zero-shot eval."""
    ann = world / "annotations"
    cmd = [sys.executable, "-m", "densevlm.cli", "pretrain", "--config", recipe, "--overwrite", "--set",
           f"output_dir={run_dir}", f"data.captions_json={ann / 'captions_train.json'}",
           f"data.image_root={world / 'images' / 'train'}", f"eval.panoptic_json={ann / 'panoptic_val.json'}",
           f"eval.image_root={world / 'images' / 'val'}", f"eval.vocabulary={world}", *sets]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"probe_pretrain_mix: the pre-training for {world.name} failed (exit {done.returncode}; its "
                         f"message is above): {' '.join(cmd)}")
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.15, 0.3, 0.5])
    parser.add_argument("--out", default="runs/probe_pretrain_mix")
    parser.add_argument("--world-recipe", default="configs/toyworld/zoo_v2.yaml",
                        help="the world (its close-up styles; the share is set per row)")
    parser.add_argument("--train-images", type=int, default=50000,
                        help="train images (scenes + close-ups) of every world; 0 keeps the recipe's num_train scenes")
    parser.add_argument("--num-val", type=int, default=None, help="val images (default: the world recipe's)")
    parser.add_argument("--world-set", nargs="*", default=[], metavar="KEY=VALUE", help="world config overrides")
    parser.add_argument("--world-workers", type=int, default=None, help="processes that render the worlds")
    parser.add_argument("--recipe", default="configs/pretrain/zoo_student.yaml", help="the pre-training recipe")
    parser.add_argument("--set", dest="sets", nargs="*", default=[], metavar="KEY=VALUE",
                        help="pre-training overrides (loop.epochs=..., model.model_overrides=...)")
    parser.add_argument("--eval-image-size", type=int, default=192, help="the crop probe's canvas (the demo's)")
    parser.add_argument("--context", type=float, nargs="+", default=[1.0], help="crop side / box side, one or more")
    parser.add_argument("--templates", default="short", help="the crop probe's prompt templates")
    parser.add_argument("--batch-size", type=int, default=16, help="the crop probe's batch")
    parser.add_argument("--max-val-images", type=int, default=None, help="the crop probe's val images (default all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (here and in the pre-trainings)")
    args = parser.parse_args()
    for share in args.shares:
        if not 0.0 <= share < 1.0:
            parser.error(f"--shares: {share} is not in [0, 1)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ceiling = importlib.import_module("probe_region_ceiling")
    out = Path(args.out).absolute()
    rows = []
    t_all = time.time()
    for share in args.shares:
        tag = f"share_{share:g}"
        extra = list(args.world_set)
        if args.world_workers is not None:
            extra.append(f"workers={args.world_workers}")
        cfg = world_config(args.world_recipe, share, args.train_images or None, args.num_val, extra)
        world = out / "worlds" / tag
        t0 = time.time()
        make_world(cfg, world)
        t_world = time.time() - t0
        run_dir = out / "runs" / tag
        t0 = time.time()
        metrics = pretrain(args.recipe, world, run_dir, args.sets, args.threads)
        t_train = time.time() - t0
        final = metrics.get("final", {})
        row: dict[str, Any] = {
            "share": share, "scenes": cfg.num_train, "closeups": cfg.num_closeups(), "val": cfg.num_val,
            "steps": metrics.get("global_step"), "world_seconds": round(t_world, 1),
            "pretrain_seconds": round(t_train, 1),
            "zeroshot": {k: v for k, v in final.items() if k.startswith("zeroshot.") and "top1" in k},
            "regions": {},
        }
        for context in args.context:
            res = ceiling.probe(str(run_dir), world, args.eval_image_size, args.templates, context, args.batch_size,
                                args.max_val_images)
            row["regions"][f"context_{context:g}"] = {k: v for k, v in res.items() if k.endswith("macc1")}
            row.setdefault("probe_seconds", 0.0)
            row["probe_seconds"] += res["seconds"]
        rows.append(row)
    report = {
        "world_recipe": args.world_recipe, "pretrain_recipe": args.recipe, "pretrain_overrides": args.sets,
        "world_overrides": args.world_set, "train_images": args.train_images, "eval_image_size": args.eval_image_size,
        "templates": args.templates, "seconds": round(time.time() - t_all, 1), "rows": rows,
    }
    text = json.dumps(report, indent=2)
    (out / "probe_pretrain_mix.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
