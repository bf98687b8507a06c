"""``densevlm zoo list|build``: the shipped pre-trained toy CLIPs, and re-making them from their recipes."""

from __future__ import annotations

import argparse
from pathlib import Path

from densevlm.cli.common import new_parser
from densevlm.config import ConfigError

NAME = "zoo"
HELP = "the model zoo: `densevlm zoo list`, `densevlm zoo build`"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP)
    tasks = p.add_subparsers(dest="zoo_task", metavar="TASK", required=True)
    ls = new_parser(tasks, "list", "the shipped pre-trained toy CLIPs, their size and quality",
                    "List the zoo's models (names usable wherever a model is taken), with their architecture, size, "
                    "training time and toy-val quality; $DENSEVLM_ZOO points at another zoo folder.")
    ls.set_defaults(fn=run_list)
    b = new_parser(tasks, "build", "re-make the zoo from its recipes (world, pre-trainings, CLIPSelf teacher)",
                   "Run the zoo recipes in configs/ (configs/toyworld/zoo.yaml, configs/pretrain/zoo_*.yaml, "
                   "configs/train/clipself_zoo_teacher.yaml) into --root and evaluate them. Takes hours on 2 CPU "
                   "cores, minutes on a GPU. Writes zoo files only with --publish; a --publish folder whose manifest "
                   "already has the entries is refused before anything runs unless --overwrite.")
    b.add_argument("--root", default="runs/zoo_build", metavar="DIR",
                   help="work folder (world, runs, evaluations) (default: %(default)s)")
    b.add_argument("--workers", type=int, default=2, help="data-loading processes per job (default: %(default)s)")
    b.add_argument("--world-workers", type=int, default=None,
                   help="processes generating the world (default: --workers)")
    b.add_argument("--parallel", action="store_true", help="run the two pre-trainings side by side (one GPU)")
    b.add_argument("--publish", nargs="?", const="package", default=None, metavar="DIR",
                   help="write fp16 weights + manifest to DIR (bare --publish: the package's own zoo)")
    b.add_argument("--overwrite", action="store_true", help="replace existing zoo entries when publishing")
    b.set_defaults(fn=run_build)


def run_list(args: argparse.Namespace) -> int:
    from densevlm.zoo import list_models

    entries = list_models()
    if not entries:
        print("the zoo is empty (no densevlm/zoo/weights/manifest.json)")
        return 0
    print(f"{'name':22s} {'architecture':18s} {'params':>8s} {'MB':>6s} {'trained':>9s}  quality (toy val, %)")
    for e in entries:
        mb = e.info.get("bytes", 0) / 1e6
        print(f"{e.name:22s} {e.architecture:18s} {(e.params or 0) / 1e6:7.2f}M {mb:6.1f} "
              f"{e.info.get('wall_seconds', 0):8.0f}s  {e.quality()}")
        print(f"{'':22s} {e.role}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from densevlm.tasks.zoo_build import build_zoo  # the recipes' jobs load torch and the models only when it runs
    from densevlm.zoo.registry import WEIGHTS_DIR

    for flag, value in (("--workers", args.workers), ("--world-workers", args.world_workers)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag}: expected an integer >= 0 (0: load data in the main process), got {value}")
    publish = None
    if args.publish is not None:
        publish = WEIGHTS_DIR if args.publish == "package" else Path(args.publish)
    result = build_zoo(args.root, workers=args.workers, world_workers=args.world_workers, parallel=args.parallel,
                       publish_dir=publish, overwrite=args.overwrite)
    for name, r in result.items():
        print(f"{name}: {r['run_dir']} ({r['info']['wall_seconds']:.0f}s) {r['info']['metrics']}")
    if publish is not None:
        print(f"published to {publish}")
    return 0
