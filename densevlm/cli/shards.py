"""``densevlm shards write``: a recipe's images (and their targets) into webdataset tar shards with a manifest."""

from __future__ import annotations

import argparse
import json

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.align import AlignConfig

NAME = "shards"
HELP = ("write a recipe's image source (data.source) into webdataset tar shards of data.shard_size images with "
        "their payload (data.shard_payload) and a manifest (count and sha256 per shard) in data.shards; "
        "resumable, parallel (--workers, and --part/--parts over machines); `train` with data.shards set streams "
        "them")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP)
    p.add_argument("action", choices=["write"], help="write (or finish writing) the shards")
    add_config_args(p, "the dataclass defaults; give a configs/train/ recipe", example="data.shards=shards/coco")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards on this machine (default: %(default)s)")
    p.add_argument("--part", type=int, default=0, help="this machine writes the shards s with s %% parts == part (default: %(default)s)")
    p.add_argument("--parts", type=int, default=1, help="machines writing the shards together (default: %(default)s)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.tasks.shards import write_shards

    cfg = load_config(AlignConfig, args.config, overrides(args))
    print(json.dumps(write_shards(cfg, workers=args.workers, part=args.part, parts=args.parts), indent=2))
    return 0
