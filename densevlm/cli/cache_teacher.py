"""``densevlm cache-teacher``: a DenseVLM recipe's teacher region features for every cell of every image."""

from __future__ import annotations

import argparse
import json

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.align import AlignConfig

NAME = "cache-teacher"
HELP = ("precompute a DenseVLM recipe's teacher region features for every grid cell of every training image into "
        "teacher_cache (resumable; several processes with `accelerate launch -m densevlm.cli cache-teacher ...`); "
        "`train --set teacher_cache=DIR` then never runs the teacher")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP)
    add_config_args(p, "the dataclass defaults; give a configs/train/ recipe", example="teacher_cache=cache/teacher")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.tasks.teacher_cache import run_cache_teacher  # torch and the teacher load only when it runs

    cfg = load_config(AlignConfig, args.config, overrides(args))
    print(json.dumps(run_cache_teacher(cfg), indent=2))
    return 0
