#!/usr/bin/env python
"""Toy accuracy of DenseVLM trained on compact versus exact teacher targets (issue 23).

On the demo's toy world and zoo models (a demo profile, the quick one by default): build the exact teacher cache
and a compact target store (top-k) of the DenseVLM stage's recipe, train DenseVLM from each for the same steps and
seeds, evaluate region classification on toy val, and print one JSON object: per seed and kind the region
metrics, and per metric the compact - exact difference (points) per seed and its max over seeds.

    python tools/compact_toy_accuracy.py --out /tmp/compact_toy --seeds 0 1 2 --k 5 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densevlm.config.core import load_config  # noqa: E402
from densevlm.config.demo import DemoConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="configs/demo/quick.yaml", help="a demo profile (world, models, stages)")
    ap.add_argument("--out", required=True, help="working folder (world, stores, runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="DenseVLM steps (0: the profile's)")
    args = ap.parse_args()

    cfg = load_config(DemoConfig, args.profile, [f"output_dir={args.out}"])
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON only
        report = run(cfg, args)
    print(json.dumps(report, indent=2))


def run(cfg: DemoConfig, args: argparse.Namespace) -> dict:
    """Build both stores, train and evaluate per seed and kind; the JSON report."""
    from densevlm.config.evaluation import PanopticDataConfig, RegionEvalConfig
    from densevlm.evaluation.regions import evaluate_regions
    from densevlm.models import run_dir_spec
    from densevlm.tasks.align import run_align
    from densevlm.tasks.demo import align_configs, eval_vocabulary, models_stage, world_stage
    from densevlm.tasks.teacher_cache import run_cache_teacher

    out = Path(args.out)
    world = world_stage(cfg, False)
    specs = models_stage(cfg, False)
    _, dense = align_configs(cfg, world, specs)
    dense.loop.cpu = True
    if args.steps:
        dense.loop.max_steps = args.steps
        dense.loop.epochs = max(dense.loop.epochs, -(-args.steps * dense.loop.batch_size // cfg.world.num_train))
    kinds = {"exact": {"teacher_cache": str(out / "targets_exact"), "kind": "exact"},
             "compact": {"teacher_cache": str(out / f"targets_compact_k{args.k}"), "kind": "compact"}}
    builds = {}
    for name, kind in kinds.items():
        c = copy.deepcopy(dense)
        c.teacher_cache, c.teacher_targets.kind, c.teacher_targets.k = kind["teacher_cache"], kind["kind"], args.k
        kind["cfg"] = c
        t0 = time.time()
        builds[name] = {**run_cache_teacher(c, progress=False), "build_seconds": round(time.time() - t0, 1)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:
        for name, kind in kinds.items():
            c = copy.deepcopy(kind["cfg"])
            c.loop.seed = seed
            c.output_dir = str(out / f"densevlm_{name}_s{seed}")
            run_align(c, overwrite=True)
            text = copy.deepcopy(cfg.eval.text)
            text.vocabulary = eval_vocabulary(cfg, world)
            ecfg = RegionEvalConfig(
                output_dir=str(out / "eval" / f"{name}_s{seed}"), model=run_dir_spec(c.output_dir),
                data=PanopticDataConfig(panoptic_json=str(world / "annotations" / "panoptic_val.json"),
                                        image_root=str(world / "images" / "val"), image_size=cfg.eval.image_size,
                                        max_images=cfg.eval.max_images),
                text=text, batch_size=cfg.eval.batch_size, num_workers=0, device="cpu")
            metrics = evaluate_regions(None, ecfg, progress=False)["metrics"]
            results.setdefault(str(seed), {})[name] = {k: float(v) for k, v in metrics.items()
                                                       if isinstance(v, (int, float))}
    keys = sorted(results[str(args.seeds[0])]["exact"])
    diffs = {key: [round(results[str(s)]["compact"][key] - results[str(s)]["exact"][key], 4) for s in args.seeds]
             for key in keys}
    return {
        "profile": args.profile, "k": args.k, "steps": dense.loop.max_steps, "seeds": args.seeds,
        "train_images": cfg.world.num_train, "val_images": cfg.world.num_val,
        "stores": {name: {key: b.get(key) for key in ("bytes_per_image", "tail_mass_max", "tail_mass_mean",
                                                      "vocabulary_size", "build_seconds")}
                   for name, b in builds.items()},
        "metrics": results,
        "compact_minus_exact": diffs,
        "max_abs_difference": {key: max(abs(d) for d in v) for key, v in diffs.items()},
    }


if __name__ == "__main__":
    main()
