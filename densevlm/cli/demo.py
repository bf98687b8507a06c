"""``densevlm demo [regions|talk2dino|detection]``: the toy-world pipelines from the zoo.

``regions`` (the default, what ``make demo`` runs) tunes the base student with CLIPSelf and DenseVLM and evaluates
regions and segmentation; ``--seeds N`` repeats that comparison over training seeds. ``talk2dino`` and
``detection`` are the separate, timed stages. The flags ``--talk2dino`` / ``--detection`` of earlier releases
still work and print a deprecation line.
"""

from __future__ import annotations

import argparse
import sys

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import ConfigError, load_config
from densevlm.config.demo import STUDENT, TEACHER, DemoConfig

NAME = "demo"
HELP = ("the whole pipeline on the toy world from the model zoo: CLIPSelf and DenseVLM students, region "
        "classification of base/CLIPSelf/DenseVLM/teacher, figures; `demo talk2dino|detection` for the other stages")
DESCRIPTION = ("The whole pipeline on the toy world on a CPU, from the model zoo: generate the world; take the "
               f"shipped student-size toy CLIP '{STUDENT}' as the base student and the shipped CLIPSelf-tuned "
               f"teacher-size toy CLIP '{TEACHER}' as DenseVLM's teacher (--from-scratch re-makes both from the zoo "
               "recipes first, hours on a CPU; settings student/teacher name other zoo models); tune the student "
               "with CLIPSelf (the baseline) and with DenseVLM (seen classes only); evaluate base, CLIPSelf, DenseVLM "
               "and the teacher on region classification and training-free semantic segmentation; draw the figures "
               "under output_dir. Finished stages are reused on a re-run with the same config. --seeds N "
               "repeats the CLIPSelf / DenseVLM comparison over N training seeds and reports mean ± std, calling a "
               "difference within the spread a tie. `densevlm demo talk2dino` and `densevlm demo detection` run the "
               "Talk2DINO and detection stages.\n\n"
               "example: densevlm demo --config configs/demo/quick.yaml\n"
               "example: densevlm demo --seeds 3\n"
               "example: densevlm demo detection --config configs/demo/quick.yaml")
TASKS = {
    "regions": "the default: CLIPSelf and DenseVLM students from the zoo, regions and segmentation of every model",
    "talk2dino": "train ψ on the toy captions with a frozen zoo backbone and compare its toy-val segmentation with "
                 "dense CLIP's (timed; section talk2dino of the config)",
    "detection": "the toy detector (needs detectron2) on the base, CLIPSelf and DenseVLM students (their stages "
                 "reused when finished), AP50 novel/base; timed, 3 x 300 detector iterations: about 41 min on 2 "
                 "quiet CPU cores (2.2 s per iteration)",
    "labels": "the toy story of a person in the loop: a toy 'domain' (classes renamed to domain words), the teacher's "
              "labels proposed for 100 unlabelled images, a SIMULATED reviewer correcting the wrong ones of 20 images "
              "from the ground truth, DenseVLM tuned with and without the corrections, and the report (section "
              "labels of the config; output_dir/labels_story/)",
}
SEEDS_HELP = ("run the seed comparison instead: tune CLIPSelf and DenseVLM N times (N >= 1) with training seeds "
              "loop.seed+0..N-1 (same world, base models and evaluation; each seed in seeds/seed_K/, reused on a "
              "re-run), evaluate every student (regions, segmentation), print mean ± std over seeds (sample std, "
              "ddof=1; not defined with N=1) and write seeds.json and figures/seeds_spread.png; a key is a tie when "
              "|mean(DenseVLM) - mean(CLIPSelf)| <= the larger of the two stds, else the higher mean is ahead; "
              "timed, about N times the demo's stages 3-6; not with talk2dino/detection")


def _options(p: argparse.ArgumentParser, seeds: bool, suppress: bool) -> None:
    """The options every demo task takes. A task's own parser leaves unset options alone (``suppress``), so
    `densevlm demo --fresh detection` and `densevlm demo detection --fresh` mean the same."""
    add_config_args(p, "the demo profile; configs/demo/quick.yaml is the quick one", example="output_dir=runs/demo2")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--from-scratch", action="store_true",
                   help="re-make the student and teacher from the zoo recipes instead of using the shipped zoo "
                   "(about 30 h on 2 CPU cores; the shipped weights are never overwritten)")
    if seeds:
        p.add_argument("--seeds", type=int, default=None, metavar="N", help=SEEDS_HELP)
    if suppress:
        for action in p._actions:
            if action.dest not in ("help",):
                action.default = argparse.SUPPRESS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    _options(p, seeds=True, suppress=False)
    for flag in ("talk2dino", "detection"):
        p.add_argument(f"--{flag}", action="store_true", help=f"deprecated: `densevlm demo {flag}`")
    tasks = p.add_subparsers(dest="demo_task", metavar="TASK")  # no task: regions
    for name, help_text in TASKS.items():
        _options(new_parser(tasks, name, help_text), seeds=name == "regions", suppress=True)
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    task = args.demo_task or "regions"
    for flag in ("talk2dino", "detection"):
        if getattr(args, flag):
            print(f"densevlm demo: --{flag} is deprecated; run `densevlm demo {flag}`", file=sys.stderr)
            if args.demo_task not in (None, flag):
                raise ConfigError(f"--{flag} and the task '{args.demo_task}' ask for two different demos")
            task = flag
    cfg = load_config(DemoConfig, args.config, overrides(args))
    if args.seeds is not None:
        if task != "regions":
            raise ConfigError("--seeds compares the region and segmentation stages over training seeds; run it "
                              "without --talk2dino / --detection (those run on the one-seed demo's students)")
        from densevlm.tasks.demo_seeds import run_seeds_demo

        run_seeds_demo(cfg, args.seeds, fresh=args.fresh, from_scratch=args.from_scratch)
        return 0
    if task == "talk2dino":
        from densevlm.tasks.demo_talk2dino import run_talk2dino_demo

        run_talk2dino_demo(cfg, fresh=args.fresh)
    elif task == "labels":
        from densevlm.tasks.demo_labels import run_labels_demo

        run_labels_demo(cfg, fresh=args.fresh)
    elif task == "detection":
        from densevlm.tasks.demo_detection import run_detection_stage

        run_detection_stage(cfg, fresh=args.fresh, from_scratch=args.from_scratch)
    else:
        from densevlm.tasks.demo import run_demo

        run_demo(cfg, fresh=args.fresh, from_scratch=args.from_scratch)
    return 0
