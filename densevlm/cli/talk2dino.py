"""``densevlm talk2dino cache|train``: Talk2DINO's feature cache and the training of ψ."""

from __future__ import annotations

import argparse

from densevlm.cli.common import TRAINING, add_config_args, add_train_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.talk2dino import Talk2DINOTrainConfig

NAME = "talk2dino"
HELP = ("Talk2DINO: `densevlm talk2dino cache|train --config configs/talk2dino/...` (cache the frozen backbone's and "
        "CLIP's features of a captions dataset, train the text-to-patch map ψ)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP)
    tasks = p.add_subparsers(dest="talk2dino_task", metavar="TASK", required=True)
    c = new_parser(tasks, "cache", "cache the frozen backbone's per-head embeddings and CLIP caption embeddings",
                   "Extract once, into safetensors shards with a manifest in cache.dir (empty: <output_dir>.cache): "
                   "per image the frozen backbone's attention-pooled embedding per head of its last block, per "
                   "caption the CLIP text embedding. A cache of other inputs is refused, naming what differs "
                   "(cache.rebuild=true replaces it).\n\nexample: densevlm talk2dino cache --config "
                   "configs/talk2dino/toy.yaml")
    add_config_args(c, "the ViT-B recipe defaults; see configs/talk2dino/", example="cache.dir=runs/t2d_cache")
    t = new_parser(tasks, "train", "train ψ (text -> patch space) from the cache (built first when missing)",
                   "Train ψ with best-head symmetric InfoNCE through the training loop, from the feature cache (built "
                   "first when missing, as `talk2dino cache` does); the run directory's weights.safetensors is ψ in "
                   "the released layout.\n\n" + TRAINING + "\n\nexample: densevlm talk2dino train --config "
                   "configs/talk2dino/toy.yaml")
    add_train_args(t, "the ViT-B recipe defaults; see configs/talk2dino/")
    for q in (c, t):
        q.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.tasks.talk2dino import run_talk2dino_cache, run_talk2dino_train  # torch loads only when it runs

    cfg = load_config(Talk2DINOTrainConfig, args.config, overrides(args))
    if args.talk2dino_task == "cache":
        path, seconds = run_talk2dino_cache(cfg)
        print(f"feature cache ready in {seconds:.0f}s -> {path}")
        return 0
    result = run_talk2dino_train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"Talk2DINO ψ trained in {result.seconds:.0f}s (cache {result.metrics['cache_seconds']:.0f}s), "
          f"{result.global_step} steps -> {result.run_dir}")
    return 0
