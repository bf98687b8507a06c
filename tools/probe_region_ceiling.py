#!/usr/bin/env python
"""What CLIPSelf distils toward: thing boxes classified from their crops, beside the same boxes pooled densely.

CLIPSelf (and the CLIPSelf-tuned teacher DenseVLM uses) trains a model's dense box features to match its own
image embedding of the box's crop. So the crop classification of thing boxes, with the model's image tower at its
native resolution, is the ceiling that distillation aims at: when ``crops.thing.macc1`` is far above
``rois.thing.macc1``, more CLIPSelf steps can still move the dense path up; when the crops themselves are low, the
image tower does not know the things at that size and only better pre-training (or a higher resolution) helps.

Per model, on a panoptic val split with the reference region protocol (the same regions, vocabulary and
prompt-ensembled text embeddings as ``densevlm eval regions``): ``rois`` (RoIAlign 1x1 on the dense map of the
``--image-size`` canvas) and ``crops`` (each thing box cut from that canvas, ``--context`` times its size, resized
to the model's native resolution by bilinear RoIAlign, encoded by the image tower). Prints one JSON object.

    python tools/probe_region_ceiling.py --world runs/demo/toyworld --models toy-student toy-teacher toy-teacher-clipself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def crop_boxes(images: torch.Tensor, boxes: list[torch.Tensor], size: int, context: float) -> torch.Tensor:
    """(sum K_i, 3, size, size) crops of normalised ``boxes`` (x0, y0, x1, y1 in [0, 1] of the canvas), each grown
    ``context`` times about its centre, bilinear-resampled; outside the canvas reads as zero (the padding value)."""
    side = images.shape[-1]
    rois = []
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        centre, half = (b[:, :2] + b[:, 2:]) / 2, (b[:, 2:] - b[:, :2]) * context / 2
        pix = torch.cat([centre - half, centre + half], dim=1) * side
        rois.append(torch.cat([torch.full((len(b), 1), float(i)), pix], dim=1))
    if not rois:
        return images.new_zeros(0, 3, size, size)
    return roi_align(images, torch.cat(rois).to(images), output_size=size, spatial_scale=1.0, sampling_ratio=2,
                     aligned=True)


@torch.no_grad()
def probe(model_name: str, world: Path, image_size: int, templates: str, context: float, batch_size: int,
          max_images: Any, device: str = "auto") -> dict[str, Any]:
    from densevlm.config.evaluation import PanopticDataConfig, RegionEvalConfig, RegionTextConfig
    from densevlm.config.model import ModelSpec
    from densevlm.data.panoptic import region_loader
    from densevlm.evaluation.regions import RegionClassificationEvaluator, build_region_dataset
    from densevlm.models import create_backbone
    from densevlm.vocab.commands import text_embeddings_from_config

    from densevlm.models import run_dir_spec

    spec = run_dir_spec(model_name) if Path(model_name).is_dir() else ModelSpec(name=model_name)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    model = create_backbone(spec).eval().to(dev)
    cfg = RegionEvalConfig(
        output_dir="", model=spec,
        data=PanopticDataConfig(panoptic_json=str(world / "annotations" / "panoptic_val.json"),
                                image_root=str(world / "images" / "val"), image_size=image_size,
                                max_images=max_images),
        text=RegionTextConfig(vocabulary=str(world), templates=templates), batch_size=batch_size)
    dataset = build_region_dataset(cfg, model.patch_size, model.image_mean, model.image_std)
    vocabulary, text = text_embeddings_from_config(model, cfg.text, dataset.vocabulary, progress=False)
    evaluator = RegionClassificationEvaluator(vocabulary, text, poolings={"rois": ("thing",), "crops": ("thing",)})
    t0 = time.time()
    for batch in tqdm(region_loader(dataset, batch_size, 2), desc=model_name, unit="batch"):
        images = batch["images"].to(dev)
        thing_boxes = [b[t].to(dev) for b, t in zip(batch["boxes"], batch["isthing"])]
        with torch.inference_mode():
            crops = crop_boxes(images, thing_boxes, model.native_image_size, context)
            features = {"rois": model.pool_boxes(model.encode_dense(images), thing_boxes),
                        "crops": model.encode_image(crops)}
        evaluator.process(batch, {k: v.float().cpu() for k, v in features.items()})
    metrics = evaluator.evaluate()["metrics"]
    return {"model": model_name, "native_image_size": model.native_image_size, "seconds": round(time.time() - t0, 1),
            **{k: round(v, 2) for k, v in metrics.items() if k.endswith(("macc1", "macc5"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="runs/demo/toyworld", help="a toy world (its panoptic val split)")
    parser.add_argument("--models", nargs="+", default=["toy-student", "toy-teacher", "toy-teacher-clipself"],
                        help="zoo names, model names or training run directories")
    parser.add_argument("--image-size", type=int, default=192, help="the dense evaluation's canvas (the demo's)")
    parser.add_argument("--templates", default="short")
    parser.add_argument("--context", type=float, default=1.0, help="crop side / box side (1.0: the box itself)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = Path(args.world)
    if not (world / "annotations" / "panoptic_val.json").is_file():
        sys.exit(f"--world {world}: no annotations/panoptic_val.json (make one with `densevlm toyworld` or the demo)")
    rows = [probe(m, world, args.image_size, args.templates, args.context, args.batch_size, args.max_images,
                  args.device) for m in args.models]
    print(json.dumps({"world": str(world), "image_size": args.image_size, "context": args.context,
                      "templates": args.templates, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
