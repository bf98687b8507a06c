"""The ``densevlm`` command line: a thin layer over the packages.

Every command takes ``--config FILE.yaml`` and ``--set key=value`` overrides; the config dataclasses define and
validate everything else (no flag soup).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional, Sequence

from densevlm.config import ConfigError, load_config
from densevlm.engine.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted

log = logging.getLogger("densevlm")

# What `densevlm --help` and each command's --help tell a user (the module docstring above is for developers).
USAGE = """Region-language alignment of CLIP-family models for open-vocabulary dense prediction (DenseVLM, CLIPSelf):
generate the toy world, pre-train a CLIP, tune its dense features, evaluate region classification, build class
text embeddings. Every command reads a YAML recipe (--config, see configs/) refined by --set KEY=VALUE."""

EXIT_CODES = """exit codes: 0 done; 1 bad input (missing/unreadable file, bad data, bad checkpoint; the message names it);
2 bad config or command line (the message names the key); 75 training preempted by SIGTERM/SIGUSR1 after
writing a checkpoint (rerun the same command with --resume); 130 interrupted (Ctrl-C)."""

TRAINING = """The run directory (output_dir) gets config.yaml, weights.safetensors, metrics.json, TensorBoard logs and
checkpoints/ (every loop.checkpoint_every epochs and, with loop.checkpoint_every_steps=N, every N steps; the last
loop.keep_checkpoints kept, each with its sha256 in checkpoints/latest.json). On SIGTERM or SIGUSR1 the run finishes
its step, checkpoints and exits with 75; --resume continues it exactly (bit-identical on CPU). A non-finite loss or
gradient stops it naming the step, the batch's images and the last good checkpoint (loop.on_nonfinite=skip skips
and counts such steps)."""

DESCRIPTIONS: dict[str, str] = {
    "toyworld": "Generate the toy open-vocabulary world: procedurally drawn images of 20 thing and 8 stuff "
                "categories with five captions each and COCO-format captions, instances, panoptic and semantic "
                "annotations, plus a seen/novel split. The world is written into a staging folder and renamed "
                "onto --out at the end, so --out is never half-written.\n\n"
                "example: densevlm toyworld --config configs/toyworld/quick.yaml --out data/toyworld",
    "pretrain": "Contrastive image-text pre-training of a CLIP (any open_clip model; the toy CLIP for the toy world) "
                "on a COCO-captions dataset, with an image-level zero-shot check on a panoptic split.\n\n"
                + TRAINING + "\n\nexample: densevlm pretrain --config configs/pretrain/toy.yaml --set loop.epochs=2",
    "train": "Region-language alignment of a CLIP's dense features: DenseVLM (a frozen teacher names grid regions; "
             "thing and stuff alignment decoupled) or CLIPSelf (self-distillation from image crops). Multi-GPU: "
             "`accelerate launch -m densevlm.cli train ...`.\n\n"
             + TRAINING + "\n\nexample: densevlm train --config configs/train/densevlm_toy.yaml "
             "--set loop.checkpoint_every_steps=200",
    "embed-text": "Build unit-norm class text embeddings of a vocabulary (built-in, a vocabulary json, a COCO "
                  "panoptic json or a toy world) with a prompt-template set, for a run directory or an open_clip "
                  "model; cached by model and vocabulary, written as .safetensors (with metadata) or .npy.\n\n"
                  "example: densevlm embed-text --model runs/densevlm_toy --vocabulary data/toyworld "
                  "--templates short --out toy.safetensors",
    "demo": "The whole pipeline on the toy world on a CPU: generate the world, pre-train the toy CLIP, tune it with "
            "CLIPSelf (the teacher) and DenseVLM, evaluate all three on region classification and draw the figures "
            "under output_dir. Finished stages are reused on a re-run with the same config.\n\n"
            "example: densevlm demo --config configs/demo/quick.yaml",
}


def _describe(text: str) -> str:
    """Paragraphs wrapped for the terminal; example lines kept whole so they can be copied."""
    return "\n".join(par if par.startswith("example") else textwrap.fill(par, 116) for par in text.split("\n"))


def _add_config_args(p: argparse.ArgumentParser, default_help: str,
                     example: str = "loop.epochs=2 optim.lr=1e-5") -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=None,
                   help=f"YAML config file (default: {default_help})")
    p.add_argument("--set", "-s", dest="overrides", metavar="KEY=VALUE", action="append", default=[], nargs="+",
                   help=f"override a config value, e.g. --set {example} (repeatable; an unknown key is an error "
                        "naming the closest valid one)")


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
    from densevlm.tasks.pretrain import run_pretrain

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
    from densevlm.tasks.align import run_align

    cfg = load_config(AlignConfig, args.config, _overrides(args))
    result = run_align(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"{cfg.method} training done in {result.seconds:.0f}s, {result.global_step} steps -> {result.run_dir}")
    for k, v in result.metrics.get("final", {}).items():
        print(f"  {k}: {v}")
    return 0


# --------------------------------------------------------------------------- cache-teacher
def cmd_cache_teacher(args: argparse.Namespace) -> int:
    import json

    from densevlm.config.align import AlignConfig
    from densevlm.tasks.teacher_cache import run_cache_teacher

    cfg = load_config(AlignConfig, args.config, _overrides(args))
    summary = run_cache_teacher(cfg)
    print(json.dumps(summary, indent=2))
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
                       description=_describe("Region classification on a COCO-panoptic-format dataset with the reference "
                       "protocol: each ground-truth segment is pooled from the model's dense features (its box: "
                       "'rois'; its mask: 'maskpool') and classified against the vocabulary's text embeddings; "
                       "mean per-class accuracy top-1/top-5 for things and stuff (seen/novel where the vocabulary "
                       "has a split). Writes regions.json, a per-class table and a foreground-bias figure into "
                       "output_dir.\n\nexample: densevlm eval regions --config configs/eval/regions_coco_eva02_b16.yaml "
                       "--set model.pretrained=runs/densevlm_eva02_b16_coco"),
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(r, "the dataclass defaults; see configs/eval/",
                     example="model.pretrained=runs/densevlm_toy data.image_size=192 batch_size=8")
    r.set_defaults(fn=cmd_eval_regions)
    s = sub.add_parser("semseg", help="training-free open-vocabulary semantic segmentation (dense CLIP vs class "
                       "text embeddings, slide inference): mIoU, fwIoU, mACC, pACC, per-class IoU",
                       description="Semantic segmentation on an image folder + label-PNG folder (detectron2/mmseg "
                       "layout); writes semseg.json, per_class.csv, class_iou.png and overlays.png into output_dir. "
                       "Several processes: `accelerate launch -m densevlm.cli eval semseg ...`.")
    _add_config_args(s, "the dataclass defaults; see configs/eval/semseg_*.yaml",
                     example="model.pretrained=runs/demo/densevlm inference.short_side=448")
    s.set_defaults(fn=cmd_eval_semseg)


# --------------------------------------------------------------------------- det
def cmd_det(args: argparse.Namespace) -> int:
    from densevlm.integrations.detectron2.det_cli import run_det_command

    return run_det_command(args)


def _det_args(p: argparse.ArgumentParser) -> None:
    from densevlm.integrations.detectron2.det_cli import add_det_args

    add_det_args(p, _add_config_args, cmd_det)


# --------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from densevlm.models import create_backbone
    from densevlm.models.layouts import export_model, verify_export
    from densevlm.models.model_arg import spec_from_model_arg

    model = create_backbone(spec_from_model_arg(args.model, args.name))
    paths = export_model(model, args.format, args.out, overwrite=args.overwrite)
    print(f"exported {model.name} ({model.family}, from {model.source}) as '{args.format}':")
    for path in paths:
        print(f"  {path}")
    if args.verify:
        diffs = verify_export(model, args.format, args.out)
        print("reloaded through the layout's reader, max abs difference: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        worst = max(diffs.values())
        if worst > args.tolerance:
            print(f"densevlm export: the reloaded model differs by {worst:.2e} > {args.tolerance:.0e}", file=sys.stderr)
            return 1
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    from densevlm.models.layouts import LAYOUTS

    p.add_argument("--model", required=True, metavar="RUN_DIR|FILE|NAME",
                   help="a run directory, a weights file (any layout we read), a local-dir export, or a zoo / "
                        "open_clip model name")
    p.add_argument("--name", default=None, metavar="MODEL_NAME",
                   help="architecture of a weights file: an open_clip name or a model-config JSON (open_clip or "
                        "reference eva_clip); not needed when the file says it (run dirs, our exports, reference EVA)")
    p.add_argument("--format", required=True, choices=sorted(LAYOUTS),
                   help="open_clip: weights + config JSON (SAN, open_clip.create_model); local-dir: open_clip Hub "
                        "folder; openai: OpenAI CLIP state dict, ViTs (CAT-Seg); eva_reference: CLIPSelf/DenseVLM "
                        "reference file, EVA02 (F-ViT)")
    p.add_argument("--out", required=True, metavar="PATH", help="output file (a folder for local-dir)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="reload the export and compare dense, image and text outputs (default: on)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="max abs difference --verify accepts")


# --------------------------------------------------------------------------- talk2dino
def cmd_talk2dino(args: argparse.Namespace) -> int:
    from densevlm.config.talk2dino import Talk2DINOTrainConfig
    from densevlm.tasks.talk2dino import run_talk2dino_cache, run_talk2dino_train

    cfg = load_config(Talk2DINOTrainConfig, args.config, _overrides(args))
    if args.talk2dino_task == "cache":
        path, seconds = run_talk2dino_cache(cfg)
        print(f"feature cache ready in {seconds:.0f}s -> {path}")
        return 0
    result = run_talk2dino_train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"Talk2DINO ψ trained in {result.seconds:.0f}s (cache {result.metrics['cache_seconds']:.0f}s), "
          f"{result.global_step} steps -> {result.run_dir}")
    return 0


def _talk2dino_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="talk2dino_task", metavar="TASK", required=True)
    c = sub.add_parser("cache", help="cache the frozen backbone's per-head embeddings and CLIP caption embeddings",
                       description="Extract once, into safetensors shards with a manifest: per image the frozen "
                       "backbone's attention-pooled embedding per head of its last block, per caption the CLIP text "
                       "embedding. A cache of other inputs is refused, naming what differs.")
    _add_config_args(c, "the ViT-B recipe defaults; see configs/talk2dino/", example="cache.dir=runs/t2d_cache")
    t = sub.add_parser("train", help="train ψ (text -> patch space) from the cache (built first when missing)",
                       description="Train ψ with best-head symmetric InfoNCE through the training loop; the run "
                       "directory's weights.safetensors is ψ in the released layout.\n\n" + TRAINING,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _train_args(t, "the ViT-B recipe defaults; see configs/talk2dino/")
    for q in (c, t):
        q.set_defaults(fn=cmd_talk2dino)


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from densevlm.config.demo import DemoConfig
    from densevlm.demo import run_demo

    cfg = load_config(DemoConfig, args.config, _overrides(args))
    if args.talk2dino:
        from densevlm.demo_talk2dino import run_talk2dino_demo

        run_talk2dino_demo(cfg, fresh=args.fresh)
        return 0
    if args.detection:
        from densevlm.demo_detection import run_detection_stage

        run_detection_stage(cfg, fresh=args.fresh, from_scratch=args.from_scratch)
        return 0
    run_demo(cfg, fresh=args.fresh, from_scratch=args.from_scratch)
    return 0


# --------------------------------------------------------------------------- zoo
def cmd_zoo_list(args: argparse.Namespace) -> int:
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


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from densevlm.zoo.build import build_zoo
    from densevlm.zoo.registry import WEIGHTS_DIR

    publish = None
    if args.publish is not None:
        publish = WEIGHTS_DIR if args.publish == "package" else Path(args.publish)
    result = build_zoo(args.root, workers=args.workers, world_workers=args.world_workers, parallel=args.parallel,
                       publish_dir=publish,
                       overwrite=args.overwrite)
    for name, r in result.items():
        print(f"{name}: {r['run_dir']} ({r['info']['wall_seconds']:.0f}s) {r['info']['metrics']}")
    if publish is not None:
        print(f"published to {publish}")
    return 0


def _zoo_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="zoo_task", metavar="TASK", required=True)
    ls = sub.add_parser("list", help="the shipped pre-trained toy CLIPs, their size and quality",
                        description="List the zoo's models (names usable wherever a model is taken).")
    ls.set_defaults(fn=cmd_zoo_list)
    b = sub.add_parser("build", help="re-make the zoo from its recipes (world, pre-trainings, CLIPSelf teacher)",
                       description="Run the zoo recipes in configs/ into --root and evaluate them. Takes hours on "
                       "2 CPU cores, minutes on a GPU. Writes zoo files only with --publish.")
    b.add_argument("--root", default="runs/zoo_build", metavar="DIR", help="work folder (world, runs, evaluations)")
    b.add_argument("--workers", type=int, default=2, help="data-loading processes per job")
    b.add_argument("--world-workers", type=int, default=None, help="processes generating the world (default: --workers)")
    b.add_argument("--parallel", action="store_true", help="run the two pre-trainings side by side (one GPU)")
    b.add_argument("--publish", nargs="?", const="package", default=None, metavar="DIR",
                   help="write fp16 weights + manifest to DIR (bare --publish: the package's own zoo)")
    b.add_argument("--overwrite", action="store_true", help="replace existing zoo entries when publishing")
    b.set_defaults(fn=cmd_zoo_build)


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _toyworld_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, "the built-in default world; see configs/toyworld/", example="num_train=256 num_val=64")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world at --out")


def _train_args(p: argparse.ArgumentParser, default: str) -> None:
    _add_config_args(p, default)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir exactly where its newest good checkpoint left it (also "
                        "inside an epoch; a corrupted checkpoint is refused and the previous one used); the same "
                        "config is required")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output_dir and start over")


def _demo_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p, "the demo profile; configs/demo/quick.yaml is the quick one", example="output_dir=runs/demo2")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--talk2dino", action="store_true",
                   help="run the Talk2DINO stage instead: train ψ on the toy captions with a frozen zoo backbone and "
                   "compare its toy-val segmentation with dense CLIP's (timed; section talk2dino of the config)")
    p.add_argument("--detection", action="store_true",
                   help="run the detection stage instead (needs detectron2): the toy detector on the base, CLIPSelf "
                        "and DenseVLM students (their stages reused when finished), AP50 novel/base; timed, 3 x 300 "
                        "detector iterations: about 41 min on 2 quiet CPU cores (2.2 s per iteration)")
    p.add_argument("--from-scratch", action="store_true",
                   help="re-make the student and teacher from the zoo recipes instead of using the shipped zoo "
                   "(about 30 h on 2 CPU cores; the shipped weights are never overwritten)")


COMMANDS: list[Command] = [
    ("toyworld", "generate a toy open-vocabulary world (COCO captions/instances/panoptic/semantic files)",
     _toyworld_args, cmd_toyworld),
    ("pretrain", "contrastive image-text pre-training of a CLIP on a COCO-captions dataset",
     lambda p: _train_args(p, "the dataclass defaults; see configs/pretrain/"), cmd_pretrain),
    ("train", "region-language alignment (DenseVLM or CLIPSelf) with accelerate; launch multi-GPU runs with "
     "`accelerate launch -m densevlm.cli train ...`",
     lambda p: _train_args(p, "the dataclass defaults; see configs/train/"), cmd_train),
    ("eval", "evaluate a model: `densevlm eval regions|semseg --config configs/eval/...` (region classification, "
     "semantic segmentation)", _eval_args, None),
    ("cache-teacher", "precompute a DenseVLM recipe's teacher region features for every grid cell of every training "
     "image into teacher_cache (resumable; several processes with `accelerate launch -m densevlm.cli "
     "cache-teacher ...`); `train --set teacher_cache=DIR` then never runs the teacher",
     lambda p: _add_config_args(p, "the dataclass defaults; give a configs/train/ recipe",
                                example="teacher_cache=cache/teacher"), cmd_cache_teacher),
    ("embed-text", "build class text embeddings for a vocabulary and template set (cached, unit norm)",
     _embed_text_args, cmd_embed_text),
    ("zoo", "the model zoo: `densevlm zoo list`, `densevlm zoo build`", _zoo_args, None),
    ("demo", "the whole pipeline on the toy world from the model zoo: CLIPSelf and DenseVLM students, region "
     "classification of base/CLIPSelf/DenseVLM/teacher, figures",
     _demo_args, cmd_demo),
    ("talk2dino", "Talk2DINO: `densevlm talk2dino cache|train --config configs/talk2dino/...` (cache the frozen "
     "backbone's and CLIP's features of a captions dataset, train the text-to-patch map ψ)", _talk2dino_args, None),
    ("export", "write a model in the checkpoint layout a consumer loads (SAN, CAT-Seg, F-ViT, open_clip)",
     _export_args, cmd_export),
    ("det", "open-vocabulary detection in detectron2 (F-ViT-style, frozen backbone): `densevlm det train|eval "
     "--config configs/det/...`; AP, AP50, AP50-novel/base", _det_args, None),
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
    if folder == "det":
        from densevlm.config.detection import DetectionConfig

        return DetectionConfig
    if folder == "talk2dino" and not Path(path).name.startswith("semseg_"):
        from densevlm.config.talk2dino import Talk2DINOTrainConfig

        return Talk2DINOTrainConfig
    if folder in ("eval", "talk2dino") and Path(path).name.startswith("semseg_"):
        from densevlm.config.semseg import SemSegEvalConfig

        return SemSegEvalConfig
    if folder not in classes:
        raise ConfigError(f"{path}: recipes live in configs/<kind>/ with kind one of "
                          f"{sorted([*classes, 'det', 'talk2dino'])}")
    return classes[folder]


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="densevlm", description=USAGE, epilog=EXIT_CODES, formatter_class=fmt)
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging, and full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, fn in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=_describe(DESCRIPTIONS.get(name, help_text)),
                           epilog=EXIT_CODES, formatter_class=fmt)
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


if __name__ == "__main__":
    sys.exit(main())
