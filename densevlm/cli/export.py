"""``densevlm export``: a model in the checkpoint layout a consumer loads (SAN, CAT-Seg, F-ViT, open_clip)."""

from __future__ import annotations

import argparse
import sys

from densevlm.cli.common import new_parser

NAME = "export"
HELP = "write a model in the checkpoint layout a consumer loads (SAN, CAT-Seg, F-ViT, open_clip)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from densevlm.models.layouts import LAYOUTS  # the choices are the layouts' registry

    p = new_parser(sub, NAME, HELP)
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
    p.add_argument("--tolerance", type=float, default=1e-6,
                   help="max abs difference --verify accepts; a larger one exits with 1, the export is kept "
                        "(default: %(default)s)")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.models import create_backbone  # torch and the models load only when a command runs
    from densevlm.models.export_check import verify_export
    from densevlm.models.layouts import export_model
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
