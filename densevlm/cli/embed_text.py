"""``densevlm embed-text``: unit-norm class text embeddings of a vocabulary and template set."""

from __future__ import annotations

import argparse

from densevlm.cli.common import new_parser

NAME = "embed-text"
HELP = "build class text embeddings for a vocabulary and template set (cached, unit norm)"
DESCRIPTION = ("Build unit-norm class text embeddings of a vocabulary (built-in, a vocabulary json, a COCO panoptic "
               "json or a toy world) with a prompt-template set, for a run directory or an open_clip model; cached "
               "by model and vocabulary, written as .safetensors (with metadata) or .npy.\n\n"
               "example: densevlm embed-text --model runs/densevlm_toy --vocabulary data/toyworld "
               "--templates short --out toy.safetensors")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    p.add_argument("--model", required=True, metavar="NAME_OR_RUN_DIR",
                   help="a run directory (its config names the model), or an open_clip model name")
    p.add_argument("--weights", default=None, metavar="FILE_OR_TAG",
                   help="weights for --model NAME: a local file (open_clip, OpenAI or CLIPSelf/DenseVLM layout) or "
                        "an open_clip pretrained tag; without it the model has random weights")
    p.add_argument("--vocabulary", default="coco_ade_316",
                   help="built-in vocabulary (coco_ade_316, coco_panoptic, ade20k_150, coco_stuff_171, "
                        "pascal_context_59, voc_21, cityscapes_19), a vocabulary/COCO-panoptic json or a toy-world "
                        "root (default: %(default)s)")
    p.add_argument("--templates", default="vild",
                   help="vild (63 hand-crafted), short (7), single, or a JSON file (default: %(default)s)")
    p.add_argument("--this-is-prefix", dest="this_is_prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix 'This is ' to templates starting with 'a'/'the' (default: the set's own setting)")
    p.add_argument("--out", default=None, help="write .safetensors (with metadata) or .npy (the reference format)")
    p.add_argument("--cache-dir", default=None, help="reuse embeddings built before for the same model/vocabulary")
    p.add_argument("--batch-size", type=int, default=256, help="class prompts per text-encoder batch "
                   "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where the text tower runs: cpu, cuda or cuda:N "
                   "(default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.config.model import ModelSpec
    from densevlm.models import create_backbone  # torch and the models load only when a command runs
    from densevlm.vocab import embed_text_main

    spec = ModelSpec(name=args.model, pretrained=args.weights) if args.weights else args.model
    model = create_backbone(spec, device=args.device)
    emb = embed_text_main(model, args.vocabulary, args.templates, args.out, args.cache_dir,
                          this_is_prefix=args.this_is_prefix, batch_size=args.batch_size,
                          progress=not args.no_progress)
    print(f"{args.vocabulary} x {args.templates}: embeddings {tuple(emb.shape)}"
          + (f" -> {args.out}" if args.out else ""))
    return 0
