"""The ``densevlm`` command line: a thin layer over the packages.

Every command takes ``--config FILE.yaml`` and ``--set key=value`` overrides; the config dataclasses define and
validate everything else (no flag soup).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from densevlm.config import ConfigError, load_config

log = logging.getLogger("densevlm")


def _add_config_args(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=None,
                   help=f"YAML config file (default: {default_help})")
    p.add_argument("--set", "-s", dest="overrides", metavar="KEY=VALUE", action="append", default=[], nargs="+",
                   help="override a config value, e.g. --set loop.epochs=2 optim.lr=1e-5 (repeatable)")


def _overrides(args: argparse.Namespace) -> list[str]:
    return [item for group in args.overrides for item in group]


# --------------------------------------------------------------------------- toyworld
def cmd_toyworld(args: argparse.Namespace) -> int:
    from densevlm.config.toyworld import ToyWorldConfig
    from densevlm.toyworld import generate_world

    cfg = load_config(ToyWorldConfig, args.config, _overrides(args))
    world = generate_world(cfg, args.out, overwrite=args.overwrite)
    n_things = sum(c["isthing"] for c in world["categories"])
    print(f"wrote toy world to {args.out}: {world['splits']} images, {n_things} thing and "
          f"{len(world['categories']) - n_things} stuff categories")
    return 0


# --------------------------------------------------------------------------- pretrain
def cmd_pretrain(args: argparse.Namespace) -> int:
    from densevlm.config.pretrain import PretrainConfig
    from densevlm.engine.pretrain import run_pretrain

    cfg = load_config(PretrainConfig, args.config, _overrides(args))
    result = run_pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    final = result.metrics.get("final", {})
    print(f"pre-training done in {result.seconds:.0f}s, {result.global_step} steps -> {result.run_dir}")
    for k, v in final.items():
        print(f"  {k}: {v}")
    return 0


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from densevlm.config.align import AlignConfig
    from densevlm.engine.align import run_align

    cfg = load_config(AlignConfig, args.config, _overrides(args))
    result = run_align(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"{cfg.method} training done in {result.seconds:.0f}s, {result.global_step} steps -> {result.run_dir}")
    for k, v in result.metrics.get("final", {}).items():
        print(f"  {k}: {v}")
    return 0


# --------------------------------------------------------------------------- embed-text
def cmd_embed_text(args: argparse.Namespace) -> int:
    from densevlm.models import create_backbone
    from densevlm.vocab import embed_text_main

    from densevlm.config.model import ModelSpec

    spec = ModelSpec(name=args.model, pretrained=args.weights) if args.weights else args.model
    model = create_backbone(spec, device=args.device)
    emb = embed_text_main(model, args.vocabulary, args.templates, args.out, args.cache_dir,
                          this_is_prefix=args.this_is_prefix, batch_size=args.batch_size,
                          progress=not args.no_progress)
    print(f"{args.vocabulary} x {args.templates}: embeddings {tuple(emb.shape)}"
          + (f" -> {args.out}" if args.out else ""))
    return 0


def _embed_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="NAME_OR_RUN_DIR",
                   help="a run directory (its config names the model), or an open_clip model name")
    p.add_argument("--weights", default=None, metavar="FILE_OR_TAG",
                   help="weights for --model NAME: a local file (open_clip, OpenAI or CLIPSelf/DenseVLM layout) or "
                        "an open_clip pretrained tag; without it the model has random weights")
    p.add_argument("--vocabulary", default="coco_ade_316",
                   help="built-in vocabulary (coco_ade_316, coco_panoptic, ade20k_150, coco_stuff_171, "
                        "pascal_context_59, voc_21, cityscapes_19), a vocabulary/COCO-panoptic json or a toy-world root")
    p.add_argument("--templates", default="vild", help="vild (63 hand-crafted), short (7), single, or a JSON file")
    p.add_argument("--this-is-prefix", dest="this_is_prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix 'This is ' to templates starting with 'a'/'the' (default: the set's own setting)")
    p.add_argument("--out", default=None, help="write .safetensors (with metadata) or .npy (the reference format)")
    p.add_argument("--cache-dir", default=None, help="reuse embeddings built before for the same model/vocabulary")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------- eval
def cmd_eval_regions(args: argparse.Namespace) -> int:
    from densevlm.config.evaluation import RegionEvalConfig
    from densevlm.evaluation.regions import evaluate_regions

    cfg = load_config(RegionEvalConfig, args.config, _overrides(args))
    result = evaluate_regions(None, cfg, progress=True)
    print(f"wrote {cfg.output_dir}/regions.json ({result['counts'].get('images', '?')} images)")
    return 0


def cmd_eval_semseg(args: argparse.Namespace) -> int:
    from densevlm.config.semseg import SemSegEvalConfig
    from densevlm.evaluation.semseg import RESULT_FILE, evaluate_semseg, format_table

    cfg = load_config(SemSegEvalConfig, args.config, _overrides(args))
    result = evaluate_semseg(None, cfg, progress=True)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(format_table(result))
        counts = result["counts"]
        print(f"wrote {cfg.output_dir}/{RESULT_FILE} ({counts['images']} images, {counts['skipped']} skipped; "
              f"metrics by {result['metrics_backend']})")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    r = sub.add_parser("regions", help="region classification (reference protocol): boxes and masks of ground-truth "
                       "panoptic segments, mean per-class accuracy top-1/top-5 for things and stuff",
                       description="Region classification on a COCO-panoptic-format dataset; writes regions.json, "
                       "a per-class table and a foreground-bias figure into output_dir.")
    _add_config_args(r, "the dataclass defaults; see configs/eval/")
    r.set_defaults(fn=cmd_eval_regions)
    s = sub.add_parser("semseg", help="training-free open-vocabulary semantic segmentation (dense CLIP vs class "
                       "text embeddings, slide inference): mIoU, fwIoU, mACC, pACC, per-class IoU",
                       description="Semantic segmentation on an image folder + label-PNG folder (detectron2/mmseg "
                       "layout); writes semseg.json, per_class.csv, class_iou.png and overlays.png into output_dir. "
                       "Several processes: `accelerate launch -m densevlm.cli eval semseg ...`.")
    _add_config_args(s, "the dataclass defaults; see configs/eval/semseg_*.yaml")
    s.set_defaults(fn=cmd_eval_semseg)


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from densevlm.config.demo import DemoConfig
    from densevlm.demo import run_demo

    cfg = load_config(DemoConfig, args.config, _overrides(args))
    run_demo(cfg, fresh=args.fresh)
    return 0


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _toyworld_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, "the built-in default world; see configs/toyworld/")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world at --out")


def _train_args(p: argparse.ArgumentParser, default: str) -> None:
    _add_config_args(p, default)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its latest checkpoint (same config required)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output_dir and start over")


def _demo_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, "the demo profile; configs/demo/quick.yaml is the quick one")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")


COMMANDS: list[Command] = [
    ("toyworld", "generate a toy open-vocabulary world (COCO captions/instances/panoptic/semantic files)",
     _toyworld_args, cmd_toyworld),
    ("pretrain", "contrastive image-text pre-training of a CLIP on a COCO-captions dataset",
     lambda p: _train_args(p, "the dataclass defaults; see configs/pretrain/"), cmd_pretrain),
    ("train", "region-language alignment (DenseVLM or CLIPSelf) with accelerate; launch multi-GPU runs with "
     "`accelerate launch -m densevlm.cli train ...`",
     lambda p: _train_args(p, "the dataclass defaults; see configs/train/"), cmd_train),
    ("eval", "evaluation: `densevlm eval regions|semseg --config configs/eval/...`", _eval_args, None),
    ("embed-text", "build class text embeddings for a vocabulary and template set (cached, unit norm)",
     _embed_text_args, cmd_embed_text),
    ("demo", "the whole pipeline on the toy world: world, pre-training, zero-shot report, figures",
     _demo_args, cmd_demo),
]


def recipe_class(path: str | Path) -> type:
    """The config class of a recipe file, from its folder under configs/ (toyworld, pretrain, demo, ...)."""
    from densevlm.config.demo import DemoConfig
    from densevlm.config.pretrain import PretrainConfig
    from densevlm.config.toyworld import ToyWorldConfig

    from densevlm.config.align import AlignConfig
    from densevlm.config.evaluation import RegionEvalConfig

    classes: dict[str, type] = {"toyworld": ToyWorldConfig, "pretrain": PretrainConfig, "demo": DemoConfig,
                                "train": AlignConfig, "eval": RegionEvalConfig}
    folder = Path(path).parent.name
    if folder == "eval" and Path(path).name.startswith("semseg_"):
        from densevlm.config.semseg import SemSegEvalConfig

        return SemSegEvalConfig
    if folder not in classes:
        raise ConfigError(f"{path}: recipes live in configs/<kind>/ with kind one of {sorted(classes)}")
    return classes[folder]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densevlm", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, fn in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        if fn is not None:  # commands with sub-tasks (eval) set fn on their own sub-parsers
            p.set_defaults(fn=fn)
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
    except (FileNotFoundError, FileExistsError, ValueError, OSError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"densevlm {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
