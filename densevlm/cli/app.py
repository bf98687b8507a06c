"""``densevlm app``: the interactive explorer, a gradio page on 127.0.0.1."""

from __future__ import annotations

import argparse

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.report import AppConfig

NAME = "app"
HELP = ("the interactive explorer (gradio, on 127.0.0.1): models side by side on an image and typed classes, the "
        "probability map of one class, the teacher's proposed labels; starts on the toy world with no argument")
DESCRIPTION = ("Serve a page on http://127.0.0.1:PORT (the loopback address only): pick models (zoo names, run "
               "directories, exports; default: the toy zoo's base and CLIPSelf-tuned models), upload an image or "
               "choose a toy-world example, type class names, and see the dense segmentation of every model side by "
               "side, the probability map of one class, and the teacher's proposed labels for the image's regions. "
               "With no argument it makes a small toy world under output_dir for its examples. Stop it with Ctrl-C.\n\n"
               "example: densevlm app\n"
               "example: densevlm app --set port=7861 \"models=[base=toy-student, densevlm=runs/demo/densevlm]\"")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    add_config_args(p, "the toy zoo and a small toy world", example="port=7861 image_size=224")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.app.ui import serve  # gradio loads only when the app runs

    cfg = load_config(AppConfig, args.config, overrides(args))
    serve(cfg)
    return 0
