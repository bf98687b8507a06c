"""The ``densevlm`` entry point: the command registry, the parser built from it, and the error-to-exit-code map."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType
from typing import Optional, Sequence

from densevlm.cli import (app, cache_teacher, compare, demo, det, embed_text, evaluate, export, labels, pretrain,
                          report, shards, talk2dino, toyworld, train, zoo)
from densevlm.cli.common import EXIT_CODES, USAGE
from densevlm.config import ConfigError
from densevlm.engine.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted

#: Every command, in the order `densevlm --help` lists them. A command is a module with ``NAME``, ``HELP``,
#: ``add_parser(subparsers)`` (which sets ``fn`` on its parser, or on its tasks' parsers) and the runs it names.
COMMANDS: tuple[ModuleType, ...] = (toyworld, pretrain, train, evaluate, cache_teacher, shards, embed_text, zoo,
                                    demo, talk2dino, export, det, compare, labels, report, app)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densevlm", description=USAGE, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging, and full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own messages at INFO; third-party libraries (open_clip, timm, accelerate) only from WARNING on.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("densevlm").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"densevlm {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except TrainingPreempted as err:
        print(f"densevlm {args.command}: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print(f"densevlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, OSError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"densevlm {args.command}: error: {err}", file=sys.stderr)
        return 1
