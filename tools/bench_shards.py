"""Benchmark shards with compact teacher targets, and project them to COCO, Objects365 and SA-1B. Prints JSON.

Measured here, on a small zoo-world sample (``--images``, generated into ``--work`` unless it is there), one
thread per process (``per core``):

* bytes per image of the teacher targets: the exact cache (every cell's fp16 features) and the compact store
  (top-k ids, probabilities and tail mass), each built by ``cache-teacher`` with the recipe's teacher; the same for
  the real-size teacher (EVA02-L, 309 cells x 768 fp16 features; compact at k with int16 ids and fp32 probs and
  tail) from the formats' arithmetic;
* ``shards write``: images/s and MB/s on one process (images re-read from the source, targets copied in);
* shard reading: images/s and MB/s of :func:`~densevlm.data.shards.read_shard` (tar parse, sha256, image and
  array decoding) on one process;
* the streaming loader: items/s of the training items (decode, resize, grid boxes, drawn cells' targets) with
  ``--workers`` loader workers, against the measured time of one DenseVLM training step on the same batches.

Projected (labelled ``projection``, with every assumption in the JSON): target storage, read bandwidth per node
and epoch time for COCO (118 k), Objects365 (1.7 M) and SA-1B (11 M) on 8, 64 and 256 GPUs (8 GPUs per node). No
GPU step has been measured in this project: the per-GPU throughput used is ``--gpu-images-per-s`` (default 300
images/s, the project's GPU target for the cached bf16 step at 512 px; not a measurement).

    python tools/bench_shards.py --images 200 --work /tmp/bench_shards
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "train" / "densevlm_toy_shards.yaml"
DATASETS = {"COCO": 118_287, "Objects365": 1_742_289, "SA-1B": 11_185_362}
GPUS = (8, 64, 256)
EVA02_L = {"cells": 309, "dim": 768}  # the paper's teacher: 17 grid choices (309 cells), 768-d region features
# Mean image file size assumed for the projection: COCO's JPEGs average ~160 kB; Objects365 ~200 kB; SA-1B's
# full-resolution JPEGs ~1.5 MB (the 11 M images are 10.5 TB). Training reads them at whatever size they are stored;
# a resized copy (e.g. 640 px longest side, ~60 kB) is the usual choice for shards and is given too.
IMAGE_BYTES = {"COCO": 160e3, "Objects365": 200e3, "SA-1B": 1.5e6}
RESIZED_BYTES = 60e3


def build_world(work: Path, images: int) -> Path:
    from densevlm.config import load_config
    from densevlm.config.toyworld import ToyWorldConfig
    from densevlm.toyworld import generate_world

    world = work / "world"
    if not (world / "annotations").is_dir():
        cfg = load_config(ToyWorldConfig, str(ROOT / "configs/toyworld/zoo.yaml"),
                          [f"num_train={images}", "num_val=8", "workers=0"])
        generate_world(cfg, world, overwrite=True)
    return world


def recipe(work: Path, world: Path, k: int, kind: str) -> "AlignConfig":  # noqa: F821
    from densevlm.config import load_config
    from densevlm.config.align import AlignConfig

    return load_config(AlignConfig, str(RECIPE), [
        f"output_dir={work / 'run'}", f"student_text.vocabulary={world}", f"teacher_text.vocabulary={world}",
        f"data.source.path={world}", f"teacher_cache={work / ('store_' + kind)}", f"teacher_targets.kind={kind}",
        f"teacher_targets.k={k}", f"data.shards={work / 'shards'}", "data.shard_size=50", "loop.cpu=true",
        "eval.data.panoptic_json=''", "loop.num_workers=0"])


def store_bytes(work: Path, world: Path, k: int, kind: str) -> dict:
    from densevlm.tasks.teacher_cache import run_cache_teacher

    cfg = recipe(work, world, k, kind)
    t0 = time.perf_counter()
    summary = run_cache_teacher(cfg, progress=False)
    seconds = time.perf_counter() - t0
    total = sum(p.stat().st_size for p in Path(cfg.teacher_cache).rglob("*.safetensors")
                if "text" not in p.parts)
    return {"bytes_per_image": round(total / summary["images"]), "images": summary["images"],
            "build_images_per_s": round(summary["images"] / seconds, 2)}


def real_size_bytes(k: int) -> dict:
    """Tensor bytes per image of EVA02-L targets, exact and compact (h23a's formula, tools/bench_compact_targets.py;
    316 classes: int16 ids)."""
    from bench_compact_targets import bytes_per_image  # (tools/ is this script's folder, on sys.path)

    b = bytes_per_image(EVA02_L["cells"], EVA02_L["dim"], 316, k)
    return {"exact_fp16": b["exact"], "compact": b["compact"], "ratio": b["ratio"]}


def shard_throughput(work: Path, world: Path, k: int) -> dict:
    from densevlm.data.shards import open_shards, read_shard
    from densevlm.tasks.shards import write_shards

    cfg = recipe(work, world, k, "compact")
    shutil.rmtree(cfg.data.shards, ignore_errors=True)
    t0 = time.perf_counter()
    out = write_shards(cfg, workers=1)
    write_s = time.perf_counter() - t0
    shards = open_shards(cfg.data.shards)
    t0 = time.perf_counter()
    n = sum(1 for s in range(len(shards.shards)) for _ in read_shard(shards, s))
    read_s = time.perf_counter() - t0
    mb = out["bytes"] / 1e6
    return {"images": out["count"], "shard_bytes_per_image": round(out["bytes"] / out["count"]),
            "write_images_per_s_per_core": round(out["count"] / write_s, 1),
            "write_MB_per_s_per_core": round(mb / write_s, 2),
            "read_images_per_s_per_core": round(n / read_s, 1), "read_MB_per_s_per_core": round(mb / read_s, 2)}


def loader_vs_step(work: Path, world: Path, k: int, workers: int, batch: int, steps: int) -> dict:
    from torch.utils.data import DataLoader

    from densevlm.tasks.align import freeze_unused
    from densevlm.tasks.densevlm import build_densevlm
    from densevlm.models import create_backbone, freeze_for_dense_tuning
    from densevlm.engine.step_module import StepModule

    cfg = recipe(work, world, k, "compact")
    cfg.loop.batch_size = batch
    student = create_backbone(cfg.student)
    parts = build_densevlm(cfg, student)
    stream = parts.dataset
    stream.configure(rank=0, world_size=1, batch_size=batch, num_workers=workers)
    stream.set_position(0, 0)
    t0 = time.perf_counter()
    batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
    load_s = time.perf_counter() - t0
    items = sum(len(b["index"]) for b in batches)
    freeze_for_dense_tuning(student, len(student.visual_blocks()))
    freeze_unused(student, 4 * student.patch_size)
    step_module = StepModule(student)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    parts.objective.prepare(torch.device("cpu"))
    times = []
    for i in range(min(steps + 1, len(batches))):
        t = time.perf_counter()
        out = parts.objective(step_module, batches[i])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    step_s = sum(times[1:]) / max(1, len(times) - 1)  # the first step warms up
    return {"loader_workers": workers, "batch": batch, "loader_items_per_s": round(items / load_s, 1),
            "step_seconds": round(step_s, 3), "step_images_per_s": round(batch / step_s, 1),
            "loader_keeps_up": items / load_s >= batch / step_s}


def projection(k: int, gpu_images_per_s: float, gpus_per_node: int) -> dict:
    rs = real_size_bytes(k)
    rows = []
    for name, n in DATASETS.items():
        for g in GPUS:
            images_per_s = g * gpu_images_per_s
            nodes = max(1, g // gpus_per_node)
            per_node = images_per_s / nodes
            rows.append({
                "dataset": name, "images": n, "gpus": g, "nodes": nodes,
                "targets_exact_TB": round(n * rs["exact_fp16"] / 1e12, 3),
                "targets_compact_GB": round(n * rs["compact"] / 1e9, 2),
                "read_per_node_MB_s_compact_targets": round(per_node * rs["compact"] / 1e6, 1),
                "read_per_node_MB_s_exact_targets": round(per_node * rs["exact_fp16"] / 1e6, 1),
                "read_per_node_MB_s_images_as_stored": round(per_node * IMAGE_BYTES[name] / 1e6, 1),
                "read_per_node_MB_s_images_resized": round(per_node * RESIZED_BYTES / 1e6, 1),
                "epoch_minutes": round(n / images_per_s / 60, 2)})
    return {"kind": "projection (not measured)", "assumptions": {
        "gpu_images_per_s": f"{gpu_images_per_s} per GPU: the project's target for the cached bf16 step at 512 px "
                            "(README GPU section); no GPU step has been measured in this project",
        "scaling": "linear in GPUs (data parallel; the gradient all-reduce hidden behind compute)",
        "gpus_per_node": gpus_per_node, "teacher": "EVA02-L, 309 cells per image, 768-d fp16 features (exact)",
        "compact": f"k={k}: int16 ids, fp32 probabilities, fp32 tail mass per cell",
        "image_bytes_as_stored": IMAGE_BYTES, "image_bytes_resized_640px": RESIZED_BYTES,
        "read": "each image and its targets read once per epoch (shards streamed, no cache across epochs)"},
        "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--work", default="/tmp/bench_shards")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1, help="loader workers for the streaming measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gpu-images-per-s", type=float, default=300.0)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--skip-measure", action="store_true", help="print the projection only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out: dict = {"threads": args.threads, "k": args.k, "real_size_bytes_per_image": real_size_bytes(args.k)}
    if not args.skip_measure:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        world = build_world(work, args.images)
        out["toy_bytes_per_image"] = {kind: store_bytes(work, world, args.k, kind) for kind in ("exact", "compact")}
        out["shards"] = shard_throughput(work, world, args.k)
        out["streaming"] = loader_vs_step(work, world, args.k, args.workers, args.batch, args.steps)
    out["projection"] = projection(args.k, args.gpu_images_per_s, args.gpus_per_node)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
