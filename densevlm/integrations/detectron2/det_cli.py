"""The ``densevlm det train|eval`` sub-commands (wired into ``densevlm.cli`` in a few lines)."""

from __future__ import annotations

import argparse
import textwrap
from typing import Callable

TRAIN_HELP = ("train the open-vocabulary detector on the base classes (detectron2's DefaultTrainer; frozen backbone), "
              "then evaluate it on all classes")
EVAL_HELP = "evaluate a detector checkpoint (weights=...): COCO AP, AP50, AP50-novel, AP50-base, per-class AP50"
DETECTOR = (
    "An F-ViT-style open-vocabulary detector in detectron2 on the frozen tuned backbone: its pyramid, FPN, RPN and "
    "a box head classifying by cosine with the class text embeddings (learned temperature and background), "
    "trained on base classes only; at test time every class, fused with the dense CLIP map's RoIAlign scores "
    "(alpha on base, beta on novel classes).")
TRAIN_DESCRIPTION = (DETECTOR + " Trains it, then evaluates it on all classes; writes det_metrics.json, "
                     "ap50_per_class.png, model_final.pth, detectron2's log and TensorBoard events into output_dir. "
                     "Several GPUs: set num_gpus (detectron2's launch).")
EVAL_DESCRIPTION = (DETECTOR + " Evaluates the detector checkpoint `weights` (a `det train` model_final.pth) on all "
                    "classes; writes det_metrics.json, ap50_per_class.png and detectron2's log into output_dir.")


def add_det_args(p: argparse.ArgumentParser, add_config_args: Callable[..., None],
                 fn: Callable[[argparse.Namespace], int], epilog: str = "") -> None:
    """The ``train`` and ``eval`` tasks on ``p``; ``epilog``: the command line's exit-code table."""
    sub = p.add_subparsers(dest="det_task", metavar="TASK", required=True)
    fill = lambda text: textwrap.fill(text, 116, break_on_hyphens=False)  # noqa: E731
    t = sub.add_parser("train", help=TRAIN_HELP, description=fill(TRAIN_DESCRIPTION) + "\n\nexample: "
                       "densevlm det train --config configs/det/toy.yaml --set backbone.model=runs/demo/densevlm",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(t, "the dataclass defaults; see configs/det/",
                    example="backbone.model=runs/demo/densevlm solver.max_iter=100")
    t.add_argument("--resume", action="store_true", help="continue from output_dir/last_checkpoint (detectron2's "
                   "resume: model, optimizer, scheduler and iteration)")
    t.set_defaults(fn=fn)
    e = sub.add_parser("eval", help=EVAL_HELP, description=fill(EVAL_DESCRIPTION) + "\n\nexample: "
                       "densevlm det eval --config configs/det/toy.yaml --set weights=runs/det/toy/model_final.pth",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(e, "the dataclass defaults; see configs/det/", example="weights=runs/det/toy/model_final.pth")
    e.set_defaults(fn=fn)


def run_det_command(args: argparse.Namespace) -> int:
    from densevlm.config import load_config
    from densevlm.config.detection import DetectionConfig
    from densevlm.integrations.detectron2 import require_detectron2

    overrides = [item for group in args.overrides for item in group]
    cfg = load_config(DetectionConfig, args.config, overrides)
    try:
        require_detectron2()
    except ImportError as err:  # the command line reports it as bad input with the install command
        raise RuntimeError(str(err)) from None
    from densevlm.integrations.detectron2.detector import RESULT_FILE, format_table, run_detection

    result = run_detection(cfg, args.det_task, resume=getattr(args, "resume", False))
    if result:
        print(format_table({cfg.backbone.model: result["metrics"]},
                           title=f"open-vocabulary detection ({cfg.data.kind}, %; novel classes never trained on)"))
        seconds = result.get("train_seconds", result.get("eval_seconds"))
        print(f"wrote {cfg.output_dir}/{RESULT_FILE} ({seconds}s)")
    return 0
