#!/usr/bin/env python
"""Benchmark region classification (``densevlm.evaluation.regions``): images per second, warm-up excluded.

Two settings, each timed over the whole per-image path (read image and PNG, resize and pad, token-grid masks,
``encode_dense``, box and mask pooling, classification against every class):

* ``toy``: the toy CLIP (``ToyCLIP-ViT-T-16``, random weights) on a toy-world val split when ``--toy-root`` is
  given, else on a synthetic panoptic set generated into a temporary folder;
* ``eva02_b16``: ``EVA02-B-16`` (random weights) at 1024 px on a few synthetic 1024×768 images.

Prints one JSON object with images/s (total, and the data / model split of the time), threads, image size,
batch size and the machine load when each run started.

The segmentation pass (``densevlm.evaluation.semseg``, dense-CLIP segmenter) times the whole per-image path too
(read image and label PNG, resize, windows, ``encode_dense``, cosine with every class, overlap averaging,
upsampling to the label size, argmax, confusion matrix) at a recipe's resolution, and reports peak memory:

* ``semseg_toy``: the toy CLIP on 192×192 synthetic label maps (28 classes), one pass per image (semseg_toy.yaml);
* ``semseg_eva02_b16``: ``EVA02-B-16`` (random weights) on synthetic 512×683 images with the 150 ADE20K classes,
  short side 448, 448×448 windows every 224 px (semseg_ade20k_150_eva02_b16.yaml).

    python tools/bench_eval.py
    python tools/bench_eval.py --toy-root runs/demo/world --threads 2 --eva-images 3
    python tools/bench_eval.py --skip-regions --semseg-eva-images 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densevlm.config.evaluation import PanopticDataConfig, RegionEvalConfig  # noqa: E402
from densevlm.evaluation.regions import (  # noqa: E402
    RegionClassificationEvaluator,
    build_region_dataset,
    run_region_evaluation,
)
from densevlm.config import load_config  # noqa: E402
from densevlm.config.semseg import SemSegDataConfig, SemSegEvalConfig  # noqa: E402
from densevlm.evaluation.semseg import evaluate_semseg  # noqa: E402
from densevlm.models import ModelSpec, create_backbone  # noqa: E402
from densevlm.vocab import text_embeddings_from_config  # noqa: E402
from densevlm.vocab.vocabulary import ClassEntry, Vocabulary  # noqa: E402

THINGS = ["cat", "dog", "car", "tree", "kite", "boat", "house", "bird"]
STUFF = ["sky", "grass", "road", "water", "sand", "wall"]


def write_synthetic_panoptic(root: Path, num_images: int, width: int, height: int, seed: int = 0) -> PanopticDataConfig:
    """A COCO-panoptic split of ``num_images`` images: 2–3 stuff bands and 2–6 rectangular things each."""
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": n, "isthing": 1} for i, n in enumerate(THINGS)]
    categories += [{"id": len(THINGS) + i + 1, "name": n, "isthing": 0} for i, n in enumerate(STUFF)]
    colours = rng.integers(0, 256, size=(len(categories) + 1, 3), dtype=np.uint8)
    png_dir, img_dir = root / "annotations" / "panoptic_val", root / "images" / "val"
    png_dir.mkdir(parents=True)
    img_dir.mkdir(parents=True)
    data: dict[str, Any] = {"images": [], "annotations": [], "categories": categories}
    for n in range(num_images):
        ids = np.zeros((height, width), dtype=np.int64)
        cats: dict[int, int] = {}
        bands = int(rng.integers(2, 4))
        edges = np.sort(rng.integers(height // 5, height - height // 5, size=bands - 1))
        for b, (top, bottom) in enumerate(zip([0, *edges], [*edges, height])):
            ids[top:bottom] = 1 + b
            cats[1 + b] = len(THINGS) + 1 + int(rng.integers(len(STUFF)))
        for t in range(int(rng.integers(2, 7))):
            h, w = (int(v) for v in rng.integers(height // 10, height // 3, size=2))
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            ids[y:y + h, x:x + w] = 100 + t
            cats[100 + t] = 1 + int(rng.integers(len(THINGS)))
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(png_dir / f"{n:06d}.png")
        picture = colours[[cats.get(int(i), 0) for i in range(int(ids.max()) + 1)]][ids]
        noise = rng.integers(-20, 21, size=picture.shape)
        Image.fromarray(np.clip(picture + noise, 0, 255).astype(np.uint8)).save(img_dir / f"{n:06d}.jpg", quality=90)
        segments = []
        for sid, cid in cats.items():
            mask = ids == sid
            if not mask.any():
                continue  # a band fully covered by things
            ys, xs = np.nonzero(mask)
            segments.append({"id": sid, "category_id": cid, "area": int(mask.sum()), "iscrowd": 0, "bbox": [
                int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})
        data["images"].append({"id": n, "file_name": f"{n:06d}.jpg", "width": width, "height": height})
        data["annotations"].append({"image_id": n, "file_name": f"{n:06d}.png", "segments_info": segments})
    json_path = root / "annotations" / "panoptic_val.json"
    json_path.write_text(json.dumps(data))
    return PanopticDataConfig(panoptic_json=str(json_path), image_root=str(img_dir))


def bench(model_name: str, data: PanopticDataConfig, *, batch_size: int, warmup_batches: int,
          num_workers: int, device: str, model_overrides: Optional[dict] = None) -> dict[str, Any]:
    cfg = RegionEvalConfig(data=data, batch_size=batch_size, num_workers=num_workers, device=device,
                           model=ModelSpec(name=model_name, model_overrides=model_overrides or {}))
    cfg.text.templates = "single"  # set-up only; the text embeddings are not part of the timed path
    model = create_backbone(cfg.model, device=device)
    dataset = build_region_dataset(cfg, model.patch_size, model.image_mean, model.image_std)
    vocabulary, text = text_embeddings_from_config(model, cfg.text, dataset.vocabulary)
    evaluator = RegionClassificationEvaluator(vocabulary, text)
    run_region_evaluation(model, dataset, evaluator, batch_size=batch_size, num_workers=0,
                          device=torch.device(device), progress=False, max_batches=warmup_batches)
    evaluator.reset()
    load = os.getloadavg()[0]
    timing = run_region_evaluation(model, dataset, evaluator, batch_size=batch_size, num_workers=num_workers,
                                   device=torch.device(device), progress=False)
    counts = evaluator.evaluate()["counts"]
    return {
        "model": model_name,
        "random_weights": True,
        "images": timing["images"],
        "image_size": data.image_size,
        "token_grid": dataset.grid,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": device,
        "regions_per_image": counts["maskpool.thing.regions"] / max(1, counts["images"])
        + counts["maskpool.stuff.regions"] / max(1, counts["images"]),
        "seconds": round(timing["total"], 3),
        "images_per_s": round(timing["images"] / timing["total"], 3),
        "data_s_per_image": round(timing["data"] / timing["images"], 4),
        "model_s_per_image": round(timing["model"] / timing["images"], 4),
        "load_avg_1m_at_start": round(load, 2),
    }


def write_synthetic_semseg(root: Path, num_images: int, width: int, height: int, num_classes: int,
                           seed: int = 0) -> SemSegDataConfig:
    """Images with coloured rectangles over bands and their label PNGs (class indices, some 255), detectron2 layout."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(num_classes, 3), dtype=np.uint8)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for n in range(num_images):
        label = np.repeat(rng.integers(0, num_classes, size=(4, 1)), height // 4 + 1, axis=0)[:height]
        label = np.broadcast_to(label, (height, width)).copy()
        for _ in range(int(rng.integers(3, 9))):
            h, w = (int(v) for v in rng.integers(height // 10, height // 3, size=2))
            y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
            label[y:y + h, x:x + w] = int(rng.integers(num_classes))
        picture = np.clip(colours[label].astype(int) + rng.integers(-20, 21, size=(height, width, 3)), 0, 255)
        label[rng.random((height, width)) < 0.01] = 255
        Image.fromarray(picture.astype(np.uint8)).save(root / "images" / f"{n:06d}.jpg", quality=90)
        Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"{n:06d}.png")
    return SemSegDataConfig(image_root=str(root / "images"), label_root=str(root / "labels"),
                            num_classes=num_classes)


def peak_memory_mb(device: str) -> float:
    """Peak CUDA memory allocated since the last reset (CUDA), else the process' peak resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench_semseg(recipe: str, model_name: str, data: SemSegDataConfig, vocabulary: str, *, device: str,
                 num_workers: int, batch_size: Optional[int] = None) -> dict[str, Any]:
    """images/s of the segmentation pass with a recipe's inference settings, after a one-image warm-up."""
    cfg = load_config(SemSegEvalConfig, Path(__file__).resolve().parents[1] / "configs" / "eval" / recipe)
    cfg.model = ModelSpec(name=model_name)
    cfg.text.vocabulary, cfg.text.templates, cfg.text.cache_dir = vocabulary, "single", None
    cfg.data, cfg.device, cfg.num_workers, cfg.figures, cfg.metrics_backend = data, device, num_workers, 0, "densevlm"
    if batch_size:
        cfg.inference.batch_size = batch_size
    model = create_backbone(cfg.model, device=device)
    from densevlm.evaluation.semseg import build_semseg_segmenter, semseg_vocabularies

    _, text_vocabulary, _ = semseg_vocabularies(cfg)
    segmenter = build_semseg_segmenter(model, cfg, text_vocabulary, progress=False)
    warm = SemSegDataConfig(**{**data.__dict__, "max_images": 1})
    evaluate_semseg(None, SemSegEvalConfig(**{**cfg.__dict__, "data": warm}), segmenter=segmenter, progress=False,
                    write=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load = os.getloadavg()[0]
    result = evaluate_semseg(None, cfg, segmenter=segmenter, progress=False, write=False)
    timing, inf = result["timing"], cfg.inference
    return {
        "recipe": recipe, "model": model_name, "random_weights": True, "classes": result["vocabulary"]["classes"],
        "images": result["counts"]["images"],
        "inference": {"short_side": inf.short_side, "mode": inf.mode, "crop_size": inf.crop_size,
                      "stride": inf.stride, "batch_size": inf.batch_size},
        "device": device, "num_workers": num_workers,
        "seconds": round(timing["seconds"], 3),
        "images_per_s": round(timing["images_per_s"], 3),
        "data_s_per_image": round(timing["data_seconds"] / max(1, result["counts"]["images"]), 4),
        "model_s_per_image": round(timing["model_seconds"] / max(1, result["counts"]["images"]), 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "peak_memory_kind": "cuda max_memory_allocated" if device.startswith("cuda") else "process max RSS",
        "load_avg_1m_at_start": round(load, 2),
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-root", default=None, help="toy-world root with annotations/panoptic_val.json")
    parser.add_argument("--toy-images", type=int, default=64)
    parser.add_argument("--toy-size", type=int, default=0, help="canvas side; 0 = the longest side of the images")
    parser.add_argument("--toy-batch", type=int, default=16)
    parser.add_argument("--eva-images", type=int, default=3)
    parser.add_argument("--eva-size", type=int, default=1024)
    parser.add_argument("--eva-batch", type=int, default=1)
    parser.add_argument("--skip-eva", action="store_true")
    parser.add_argument("--skip-regions", action="store_true", help="only the segmentation pass")
    parser.add_argument("--skip-semseg", action="store_true", help="only region classification")
    parser.add_argument("--semseg-toy-images", type=int, default=32)
    parser.add_argument("--semseg-eva-images", type=int, default=2)
    parser.add_argument("--semseg-batch", type=int, default=0, help="windows per forward (0: the recipe's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: in-process)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": args.device},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        if not args.skip_semseg:
            toy = write_synthetic_semseg(tmp / "semseg_toy", args.semseg_toy_images, 192, 192, 28)
            vocab = tmp / "toy_vocab.json"
            Vocabulary("bench28", tuple(ClassEntry(f"class {i}") for i in range(28))).to_json(vocab)
            out["semseg_toy"] = {"data": "synthetic 192x192, 28 classes", **bench_semseg(
                "semseg_toy.yaml", "ToyCLIP-ViT-T-16", toy, str(vocab), device=args.device,
                num_workers=args.num_workers, batch_size=args.semseg_batch)}
            if not args.skip_eva:
                ade = write_synthetic_semseg(tmp / "semseg_ade", args.semseg_eva_images, 683, 512, 150, seed=1)
                out["semseg_eva02_b16"] = {"data": "synthetic 683x512 (ADE20K-like), 150 classes", **bench_semseg(
                    "semseg_ade20k_150_eva02_b16.yaml", "EVA02-B-16", ade, "ade20k_150", device=args.device,
                    num_workers=args.num_workers, batch_size=args.semseg_batch)}
        if args.skip_regions:
            print(json.dumps(out, indent=2))
            return out
        if args.toy_root:
            root = Path(args.toy_root)
            toy = PanopticDataConfig(panoptic_json=str(root / "annotations" / "panoptic_val.json"),
                                     image_root=str(root / "images" / "val"), max_images=args.toy_images)
            source = f"toy world {root}"
        else:
            toy = write_synthetic_panoptic(tmp / "toy", args.toy_images, 192, 192)
            source = "synthetic 192x192"
        if args.toy_size:
            toy.image_size = args.toy_size
        else:
            first = json.loads(Path(toy.panoptic_json).read_text())["images"][0]
            toy.image_size = max(int(first["width"]), int(first["height"]))
        out["toy"] = {"data": source, **bench("ToyCLIP-ViT-T-16", toy, batch_size=args.toy_batch,
                                              warmup_batches=1, num_workers=args.num_workers, device=args.device)}
        if not args.skip_eva:
            eva = write_synthetic_panoptic(tmp / "eva", args.eva_images, 1024, 768, seed=1)
            eva.image_size = args.eva_size
            result = bench("EVA02-B-16", eva, batch_size=args.eva_batch, warmup_batches=1,
                           num_workers=args.num_workers, device=args.device)
            out["eva02_b16"] = {"data": "synthetic 1024x768", **result}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
