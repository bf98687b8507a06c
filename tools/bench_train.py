"""Benchmark one DenseVLM training step: step time, images/s, peak memory, model FLOP/s, matmul peak and MFU.

Prints JSON. Two setups:
* ``toy``: the toy-world recipe (tiny CLIP student and teacher at the demo's dense resolution);
* ``real``: the paper's models with random weights, EVA02-B-16 student + EVA02-L-14-336 teacher, 512 px, batch 2.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one full step (teacher forward, student
forward and backward); the optimiser update is timed but not counted. The matmul peak is measured on this machine
with large float32 (CPU) or bf16 (CUDA) matrix products; MFU = achieved model FLOP/s / that peak.

    python tools/bench_train.py                 # both setups
    python tools/bench_train.py --setup toy --threads 2 --steps 5
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from densevlm.config.model import ModelSpec
from densevlm.data.grid_boxes import grid_boxes, grid_choices
from densevlm.engine.optim import build_optimizer
from densevlm.config.train import OptimConfig
from densevlm.engine.step_module import StepModule
from densevlm.methods.densevlm import DenseVLMObjective
from densevlm.models import create_backbone, freeze_for_dense_tuning

SETUPS = {
    "toy": {"student": "ToyCLIP-ViT-T-16", "teacher": "ToyCLIP-ViT-T-16", "image_size": 192, "batch": 16,
            "classes": 21, "things": 15},
    "real": {"student": "EVA02-B-16", "teacher": "EVA02-L-14-336", "image_size": 512, "batch": 2,
             "classes": 316, "things": 204},
}


def matmul_peak(device: torch.device, n: int = 2048, iters: int = 10) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(batch: int, size: int, max_boxes: int = 36) -> dict[str, torch.Tensor]:
    rng = random.Random(0)
    boxes, valid = [], []
    for _ in range(batch):
        b, v, _ = grid_boxes(size, size, 1.0, size, rng, grid_choices(6), max_boxes)
        boxes.append(b)
        valid.append(v)
    return {"image": torch.randn(batch, 3, size, size), "boxes": torch.stack(boxes), "valid": torch.stack(valid)}


def bench(name: str, steps: int, device: torch.device) -> dict:
    s = SETUPS[name]
    student = create_backbone(ModelSpec(name=s["student"])).to(device)
    teacher = create_backbone(ModelSpec(name=s["teacher"])).to(device)
    freeze_for_dense_tuning(student, len(student.visual_blocks()))
    g = torch.Generator().manual_seed(0)
    # Random unit class embeddings stand in for encoded prompts: the text towers are frozen and outside the step.
    t_text = F.normalize(torch.randn(s["classes"], teacher.embed_dim, generator=g), dim=-1)
    s_text = F.normalize(torch.randn(s["classes"], student.embed_dim, generator=g), dim=-1)
    thing = torch.arange(s["classes"]) < s["things"]
    objective = DenseVLMObjective(teacher, t_text, s_text, thing, threshold=0.0)
    objective.prepare(device)
    step_model = StepModule(student).train()
    optimizer = build_optimizer(student, OptimConfig(lr=1e-5))
    batch = {k: v.to(device) for k, v in make_batch(s["batch"], s["image_size"]).items()}

    def step() -> None:
        out = objective(step_model, batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, caches)
    with FlopCounterMode(display=False) as counter:
        out = objective(step_model, batch)
        out.loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    peak_mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peak = matmul_peak(device)
    return {
        "setup": name, "student": s["student"], "teacher": s["teacher"], "image_size": s["image_size"],
        "batch": s["batch"], "steps_timed": steps, "step_seconds": round(step_s, 4),
        "images_per_second": round(s["batch"] / step_s, 2), "peak_memory_bytes": int(peak_mem),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "model_flops_per_step": int(flops), "achieved_flops_per_second": round(flops / step_s),
        "matmul_peak_flops_per_second": round(peak), "mfu": round(flops / step_s / peak, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", choices=["toy", "real", "all"], default="all")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = ["toy", "real"] if args.setup == "all" else [args.setup]
    results = [bench(n, args.steps if n == "toy" else max(1, min(args.steps, 2)), device) for n in names]
    print(json.dumps({"device": str(device), "threads": args.threads, "torch": torch.__version__,
                      "machine": platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
