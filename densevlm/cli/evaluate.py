"""``densevlm eval regions|semseg``: region classification (reference protocol) and training-free segmentation."""

from __future__ import annotations

import argparse

from densevlm.cli.common import add_config_args, new_parser, overrides
from densevlm.config import load_config
from densevlm.config.evaluation import RegionEvalConfig
from densevlm.config.semseg import SemSegEvalConfig

NAME = "eval"
HELP = ("evaluate a model: `densevlm eval regions|semseg --config configs/eval/...` (region classification, "
        "semantic segmentation)")
REGIONS = ("Region classification on a COCO-panoptic-format dataset with the reference protocol: each ground-truth "
           "segment is pooled from the model's dense features (its box: 'rois'; its mask: 'maskpool') and "
           "classified against the vocabulary's text embeddings; mean per-class accuracy top-1/top-5 for things "
           "and stuff (seen/novel where the vocabulary has a split). Writes regions.json, a per-class table and a "
           "foreground-bias figure into output_dir.\n\nexample: densevlm eval regions --config "
           "configs/eval/regions_coco_eva02_b16.yaml --set model.pretrained=runs/densevlm_eva02_b16_coco")
SEMSEG = ("Training-free semantic segmentation on an image folder + label-PNG folder (detectron2/mmseg layout): "
          "segmenter 'dense_clip' classifies every patch of the model's dense map against the class text "
          "embeddings; 'talk2dino' scores a frozen backbone's patches against ψ(class text). Writes semseg.json, "
          "per_class.csv, class_iou.png and overlays.png into output_dir. Several processes: `accelerate launch -m "
          "densevlm.cli eval semseg ...`.\n\nexample: densevlm eval semseg --config configs/eval/semseg_toy.yaml "
          "--set model.pretrained=runs/demo/densevlm")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = new_parser(sub, NAME, HELP)
    tasks = p.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    r = new_parser(tasks, "regions", "region classification (reference protocol): boxes and masks of ground-truth "
                   "panoptic segments, mean per-class accuracy top-1/top-5 for things and stuff", REGIONS)
    add_config_args(r, "the dataclass defaults; see configs/eval/",
                    example="model.pretrained=runs/densevlm_toy data.image_size=192 batch_size=8")
    r.set_defaults(fn=run_regions)
    s = new_parser(tasks, "semseg", "training-free open-vocabulary semantic segmentation (dense CLIP or Talk2DINO vs "
                   "class text embeddings, whole or slide inference): mIoU, fwIoU, mACC, pACC, per-class IoU", SEMSEG)
    add_config_args(s, "the dataclass defaults; see configs/eval/semseg_*.yaml",
                    example="model.pretrained=runs/demo/densevlm inference.short_side=448")
    s.set_defaults(fn=run_semseg)


def run_regions(args: argparse.Namespace) -> int:
    from densevlm.evaluation.regions import evaluate_regions  # torch and the models load only when it runs

    cfg = load_config(RegionEvalConfig, args.config, overrides(args))
    result = evaluate_regions(None, cfg, progress=True)
    print(f"wrote {cfg.output_dir}/regions.json ({result['counts'].get('images', '?')} images)")
    return 0


def run_semseg(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from densevlm.evaluation.semseg import RESULT_FILE, evaluate_semseg, format_table

    cfg = load_config(SemSegEvalConfig, args.config, overrides(args))
    result = evaluate_semseg(None, cfg, progress=True)
    if PartialState().is_main_process:
        print(format_table(result))
        counts = result["counts"]
        print(f"wrote {cfg.output_dir}/{RESULT_FILE} ({counts['images']} images, {counts['skipped']} skipped; "
              f"metrics by {result['metrics_backend']})")
    return 0
