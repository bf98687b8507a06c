"""``densevlm compare``: base, CLIPSelf, DenseVLM and DeCLIP under one protocol (tasks/compare.py)."""

from __future__ import annotations

import argparse

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.compare import CompareConfig

NAME = "compare"
HELP = ("train (or reuse) CLIPSelf, DenseVLM and DeCLIP students over N seeds on the same data and evaluate them "
        "and the base with the same evaluators: one table (markdown + JSON) and one figure")
DESCRIPTION = (HELP + ". Regions (six keys, seen/novel), segmentation mIoU with a Talk2DINO column on the base "
               "backbone, detection AP50-novel with with_detection=true (needs detectron2). Finished stages are "
               "reused on a re-run with the same config.\n\n"
               "example: densevlm compare --config configs/compare/quick.yaml\n"
               "example: densevlm compare --config configs/compare/toy.yaml --set seeds=3")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    add_config_args(p, "the comparison profile; configs/compare/quick.yaml is the quick one", example="seeds=2")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--from-scratch", action="store_true", help="re-make the zoo models first (hours on a CPU)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.tasks.compare import run_compare

    cfg = load_config(CompareConfig, args.config, overrides(args))
    run_compare(cfg, fresh=args.fresh, from_scratch=args.from_scratch)
    return 0
