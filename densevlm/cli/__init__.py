"""The ``densevlm`` command line: a thin layer over the packages, one module per command.

Each command module (``toyworld``, ``pretrain``, ``train``, ``eval``, ``cache-teacher``, ``embed-text``, ``zoo``,
``demo``, ``talk2dino``, ``export``, ``det``) exposes ``add_parser(subparsers)`` and its ``run`` functions, as
accelerate's commands do; ``main.py`` lists them and maps errors to exit codes. Every command takes
``--config FILE.yaml`` and ``--set key=value`` overrides; the config dataclasses define and validate everything
else (no flag soup). The commands import torch and the models inside their ``run`` functions so that
``densevlm --help`` and a config error answer at once. Which config class a recipe file is lives in
:mod:`densevlm.config.recipes`.
"""

from densevlm.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
