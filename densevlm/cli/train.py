"""``densevlm train``: region-language alignment (DenseVLM, CLIPSelf) through the training loop."""

from __future__ import annotations

import argparse

from densevlm.cli.common import TRAINING, add_train_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.align import AlignConfig

NAME = "train"
HELP = ("region-language alignment (DenseVLM or CLIPSelf) with accelerate; launch multi-GPU runs with "
        "`accelerate launch -m densevlm.cli train ...`")
DESCRIPTION = ("Region-language alignment of a CLIP's dense features: DenseVLM (a frozen teacher names grid "
               "regions; thing and stuff alignment decoupled) or CLIPSelf (self-distillation from image crops). "
               "Multi-GPU: `accelerate launch -m densevlm.cli train ...`.\n\n"
               + TRAINING + "\n\nexample: densevlm train --config configs/train/densevlm_toy.yaml "
               "--set loop.checkpoint_every_steps=200")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    add_train_args(p, "the dataclass defaults; see configs/train/")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.tasks.align import run_align  # torch and the models load only when a command runs

    cfg = load_config(AlignConfig, args.config, overrides(args))
    result = run_align(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"{cfg.method} training done in {result.seconds:.0f}s, {result.global_step} steps -> {result.run_dir}")
    for k, v in result.metrics.get("final", {}).items():
        print(f"  {k}: {v}")
    return 0
