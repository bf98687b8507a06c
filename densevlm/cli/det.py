"""``densevlm det train|eval``: open-vocabulary detection in detectron2 (parser and driver in the integration)."""

from __future__ import annotations

import argparse

from densevlm.cli.common import EXIT_CODES, add_config_args, new_parser

NAME = "det"
HELP = ("open-vocabulary detection in detectron2 (F-ViT-style, frozen backbone): `densevlm det train|eval "
        "--config configs/det/...`; AP, AP50, AP50-novel/base")


def add_parser(sub: argparse._SubParsersAction) -> None:
    # The integration's own module holds its parser: it imports no detectron2 until a det command runs.
    from densevlm.integrations.detectron2.det_cli import add_det_args

    add_det_args(new_parser(sub, NAME, HELP), add_config_args, run, epilog=EXIT_CODES)


def run(args: argparse.Namespace) -> int:
    from densevlm.integrations.detectron2.det_cli import run_det_command

    return run_det_command(args)
