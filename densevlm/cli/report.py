"""``densevlm report``: a proof-of-concept report (one HTML page and its PNGs) of several models on a small set."""

from __future__ import annotations

import argparse

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.report import ReportConfig

NAME = "report"
HELP = ("a proof-of-concept report of several models (zoo names, run directories, exports) on a small labelled set: "
        "one HTML page with per-class IoU, region accuracy, foreground bias, confusions, best/worst images")
DESCRIPTION = ("Score every model of `models` on a small labelled set (a COCO panoptic json, or semantic PNGs with "
               "their class list; 20 to 200 images) and write output_dir/index.html with its PNGs and report.json: "
               "per-class IoU (dense segmentation) and region accuracy (ground-truth masks pooled and named), the "
               "foreground bias of stuff regions per model, the classes most confused, overlays of the best and "
               "worst images, and, with corrections.file, how many labels a reviewer corrected and what that "
               "changed (corrections.model minus corrections.baseline). A vocabulary class without any label in "
               "the set is a warning listing them.\n\n"
               "example: densevlm report -c configs/report/toy.yaml --set data.panoptic_json=data/toyworld/"
               "annotations/panoptic_val.json data.image_root=data/toyworld/images/val\n"
               "example: densevlm report -c configs/report/toy.yaml --set \"models=[base=toy-student, "
               "densevlm=runs/demo/densevlm]\"")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP, DESCRIPTION)
    add_config_args(p, "the dataclass defaults; configs/report/toy.yaml for the toy world",
                    example="output_dir=runs/report2 data.max_images=50")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from densevlm.tasks.report import run_report

    cfg = load_config(ReportConfig, args.config, overrides(args))
    result = run_report(cfg, progress=True)
    print(f"wrote {cfg.output_dir}/index.html ({result['set']['images']} images, {len(result['summary'])} models, "
          f"{result['seconds']:.0f}s)")
    return 0
