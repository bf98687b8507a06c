"""``densevlm toyworld``: generate the toy open-vocabulary world."""

from __future__ import annotations

import argparse

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.toyworld import ToyWorldConfig

NAME = "toyworld"
HELP = "generate a toy open-vocabulary world (COCO captions/instances/panoptic/semantic files)"
DESCRIPTION = ("Generate the toy open-vocabulary world: procedurally drawn images of 20 thing and 8 stuff "
               "categories with five captions each and COCO-format captions, instances, panoptic and semantic "
               "annotations, plus a seen/novel split. The world is written into a staging folder and renamed "
               "onto --out at the end, so --out is never half-written.\n\n"
               "example: densevlm toyworld --config configs/toyworld/quick.yaml --out data/toyworld")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    add_config_args(p, "the built-in default world; see configs/toyworld/", example="num_train=256 num_val=64")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world at --out")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.toyworld import generate_world  # the drawing code loads only when a world is made

    cfg = load_config(ToyWorldConfig, args.config, overrides(args))
    world = generate_world(cfg, args.out, overwrite=args.overwrite)
    n_things = sum(c["isthing"] for c in world["categories"])
    print(f"wrote toy world to {args.out}: {world['splits']} images, {n_things} thing and "
          f"{len(world['categories']) - n_things} stuff categories")
    return 0
