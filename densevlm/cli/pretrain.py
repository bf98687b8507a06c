"""``densevlm pretrain``: contrastive image-text pre-training of a CLIP."""

from __future__ import annotations

import argparse

from densevlm.cli.common import TRAINING, add_train_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.pretrain import PretrainConfig

NAME = "pretrain"
HELP = "contrastive image-text pre-training of a CLIP on a COCO-captions dataset"
DESCRIPTION = ("Contrastive image-text pre-training of a CLIP (any open_clip model; the toy CLIP for the toy world) "
               "on a COCO-captions dataset, with an image-level zero-shot check on a panoptic split.\n\n"
               + TRAINING + "\n\nexample: densevlm pretrain --config configs/pretrain/toy.yaml --set loop.epochs=2")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    add_train_args(p, "the dataclass defaults; see configs/pretrain/")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.tasks.pretrain import run_pretrain  # torch and the models load only when a command runs

    cfg = load_config(PretrainConfig, args.config, overrides(args))
    result = run_pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    final = result.metrics.get("final", {})
    print(f"pre-training done in {result.seconds:.0f}s, {result.global_step} steps -> {result.run_dir}")
    for k, v in final.items():
        print(f"  {k}: {v}")
    return 0
