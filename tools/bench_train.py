"""Benchmark DenseVLM training steps: step time, images/s, peak memory, model FLOPs, matmul peak and MFU.

Prints JSON. Two setups:
* ``toy``: the toy-world recipe (tiny CLIP student and teacher at the demo's dense resolution);
* ``real``: the paper's models with random weights, EVA02-B-16 student + EVA02-L-14-336 teacher, 512 px, batch 2.

Variants (``--variants``):
* ``fp32``, ``bf16``: one step with the online teacher, in full precision or under bf16 autocast (student and
  teacher; the logits and the loss stay fp32);
* ``fp32-cache``, ``bf16-cache``: the teacher's region features come from the teacher-target cache (the teacher is
  not built; the batch carries fp16 cell features, as the cache's data loader delivers them);
* ``e2e``: end to end with the data loader: COCO-like 640x480 JPEGs are generated, their teacher cache is built
  with the real teacher (cache size per image and build speed are reported), and steps are timed through a
  DataLoader with ``--workers`` workers reading JPEGs and cache shards, in the precision of ``--e2e-precision``.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over the first (warm-up) step: teacher forward,
student forward and backward; the optimiser update is timed but not counted. The CPU flash-attention kernel that
``scaled_dot_product_attention`` runs has no formula in torch, so one is registered here (the same count torch uses
for the CUDA kernels). The matmul peak of each dtype is the best of several large products on this machine; MFU =
achieved model FLOP/s / the peak of the variant's dtype. A low-precision variant whose matmul peak is below half
the fp32 one (a CPU without native bf16, e.g. AVX2 only) is reported as skipped with both peaks, unless
``--force-low-precision``: there it would only be slower.

    python tools/bench_train.py                                   # toy and real, all variants
    python tools/bench_train.py --setup real --variants fp32 fp32-cache e2e --threads 2
    python tools/bench_train.py --setup real --variants fp32-cache --profile 15   # top ops by self CPU time
    python tools/bench_train.py --setup real --variants fp32-cache --image-size 768 --classes 1203
    python tools/bench_train.py --setup real --variants fp32 fp32-cache --interleave 3 --steps 1   # A/B medians
    python tools/bench_train.py --setup real --variants fp32-cache --steps 3 --compile   # torch.compile'd blocks
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from torch.utils.flop_counter import FlopCounterMode

from densevlm.config.model import ModelSpec
from densevlm.config.train import OptimConfig
from densevlm.data.grid_boxes import cell_offsets, grid_boxes_with_cells, grid_choices
from densevlm.engine.optim import build_optimizer
from densevlm.engine.step_module import StepModule
from densevlm.engine.trainer import compile_blocks
from densevlm.utils.peak import matmul_peak, peak_rss, sync
from densevlm.methods.densevlm import DenseVLMObjective
from densevlm.models import create_backbone, freeze_for_dense_tuning

SETUPS = {
    "toy": {"student": "ToyCLIP-ViT-T-16", "teacher": "ToyCLIP-ViT-T-16", "image_size": 192, "batch": 16,
            "classes": 21, "things": 15},
    "real": {"student": "EVA02-B-16", "teacher": "EVA02-L-14-336", "image_size": 512, "batch": 2,
             "classes": 316, "things": 204},
}
VARIANTS = ("fp32", "bf16", "fp32-cache", "bf16-cache", "e2e")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------- FLOPs, peak
def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def attention_flop_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention ops (torch counts only the CUDA ones)."""
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd
    return out


def shallow_overrides(model: str, depth: int) -> dict[str, Any]:
    """``model_overrides`` that cut a model's vision tower to ``depth`` blocks: open_clip ViTs take
    ``vision_cfg.layers``; a timm trunk (EVA02) gets a registered twin of its timm model with ``depth`` blocks."""
    import open_clip
    import timm
    from timm.models import register_model

    from densevlm.models import register_model_configs
    from densevlm.models.factory import resolve_model_name

    register_model_configs()
    vision = open_clip.get_model_config(resolve_model_name(model))["vision_cfg"]
    trunk = vision.get("timm_model_name")
    if not trunk:
        return {"vision_cfg": {"layers": depth}}
    name = f"{trunk}_bench_depth{depth}"
    if not timm.is_model(name):
        def entry(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            return timm.create_model(trunk, pretrained=False, depth=depth, **kwargs)

        entry.__name__ = entry.__qualname__ = name
        register_model(entry)
    return {"vision_cfg": {"timm_model_name": name}}


# ------------------------------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: VmHWM) so each variant reports its own; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------- batches
def make_batch(batch: int, size: int, teacher_dim: Optional[int], max_boxes: int = 36) -> dict[str, torch.Tensor]:
    """Square images with the recipe's grid boxes; with ``teacher_dim`` also cached-looking fp16 cell features."""
    rng = random.Random(0)
    choices = grid_choices(6)
    boxes, valid, cells = [], [], []
    for _ in range(batch):
        b, v, _, c = grid_boxes_with_cells(size, size, 1.0, size, rng, choices, max_boxes)
        boxes.append(b)
        valid.append(v)
        cells.append(c)
    out = {"image": torch.randn(batch, 3, size, size), "boxes": torch.stack(boxes), "valid": torch.stack(valid),
           "cells": torch.stack(cells)}
    if teacher_dim is not None:
        g = torch.Generator().manual_seed(1)
        table = F.normalize(torch.randn(batch, cell_offsets(choices)[-1], teacher_dim, generator=g), dim=-1).half()
        feats = torch.stack([t[c.clamp(min=0)] * (c >= 0)[:, None] for t, c in zip(table, out["cells"])])
        out["teacher_features"], out["cached"] = feats, torch.ones(batch, dtype=torch.bool)
    return out


def write_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """COCO-like 640x480 JPEGs (smooth colour fields with noise, quality 90: realistic decode cost and size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((640, 480), Image.BICUBIC), dtype=np.int16)
        noise = rng.integers(-20, 20, (480, 640, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:012d}.jpg", quality=90)


# ------------------------------------------------------------------------------------------------- one variant
class Bench:
    """Builds each model once per process and times variants one after the other."""

    def __init__(self, setup: str, device: torch.device, image_size: Optional[int], classes: Optional[int],
                 batch: Optional[int] = None, depth: Optional[int] = None) -> None:
        self.s = dict(SETUPS[setup])
        self.s["image_size"] = image_size or self.s["image_size"]
        self.s["batch"] = batch or self.s["batch"]
        # ``depth``: both vision towers cut to that many blocks (a dry run of the script, not a measurement)
        self.s["depth"] = depth
        self.overrides = {m: shallow_overrides(self.s[m], depth) if depth else {} for m in ("student", "teacher")}
        if classes:
            self.s["classes"], self.s["things"] = classes, max(1, round(classes * self.s["things"] / self.s["classes"]))
        self.name, self.device = setup, device
        self.compile = False
        self.warmup = 0
        self.peak_sizes: Optional[tuple[int, ...]] = None
        self.force_low_precision = False
        self._teacher = None
        self.peaks: dict[str, dict[str, Any]] = {}

    def teacher(self) -> torch.nn.Module:
        if self._teacher is None:
            self._teacher = create_backbone(ModelSpec(name=self.s["teacher"], model_overrides=self.overrides["teacher"]))
            self._teacher = self._teacher.to(self.device)
        return self._teacher

    def drop_teacher(self) -> None:
        self._teacher = None
        gc.collect()

    def peak(self, precision: str) -> dict[str, Any]:
        if precision not in self.peaks:
            sizes = {"sizes": self.peak_sizes} if self.peak_sizes else {}
            self.peaks[precision] = matmul_peak(self.device, DTYPES[precision], **sizes)
        return self.peaks[precision]

    def objective(self, student: torch.nn.Module, cached: bool, precision: str) -> DenseVLMObjective:
        g = torch.Generator().manual_seed(0)
        t_dim = self.teacher_dim()
        # Random unit class embeddings stand in for encoded prompts: the text towers are frozen and outside the step.
        t_text = F.normalize(torch.randn(self.s["classes"], t_dim, generator=g), dim=-1)
        s_text = F.normalize(torch.randn(self.s["classes"], student.embed_dim, generator=g), dim=-1)
        thing = torch.arange(self.s["classes"]) < self.s["things"]
        obj = DenseVLMObjective(None if cached else self.teacher(), t_text, s_text, thing, threshold=0.0,
                                teacher_autocast=torch.bfloat16 if precision == "bf16" else None)
        obj.prepare(self.device)
        return obj

    def teacher_dim(self) -> int:
        import open_clip

        from densevlm.models import register_model_configs
        from densevlm.models.factory import resolve_model_name

        register_model_configs()
        return int(open_clip.get_model_config(resolve_model_name(self.s["teacher"]))["embed_dim"])

    def student(self) -> torch.nn.Module:
        student = create_backbone(ModelSpec(name=self.s["student"], model_overrides=self.overrides["student"])).to(self.device)
        freeze_for_dense_tuning(student, len(student.visual_blocks()))
        if self.compile:  # as loop.compile does it: each block through inductor, forward and backward
            compile_blocks(student)
        return student

    def run(self, variant: str, steps: int, profile: int = 0, workers: int = 2, e2e_precision: str = "fp32",
            e2e_images: int = 0) -> dict[str, Any]:
        precision = e2e_precision if variant == "e2e" else variant.split("-")[0]
        cached = variant == "e2e" or variant.endswith("-cache")
        peak = self.peak(precision)
        if precision != "fp32" and peak["flops_per_second"] < 0.5 * self.peak("fp32")["flops_per_second"]:
            if not self.force_low_precision:
                return {"variant": variant, "skipped": f"{precision} matmul peak {peak['flops_per_second'] / 1e9:.2f} "
                        f"GFLOP/s is below half the fp32 peak {self.peak('fp32')['flops_per_second'] / 1e9:.1f} "
                        "GFLOP/s on this device (no native bf16): it would only be slower",
                        "matmul_peak": peak}
        extra: dict[str, Any] = {}
        if variant == "e2e":
            batches, extra = self.e2e_batches(steps + 1 + self.compile + self.warmup, workers, e2e_images)
        else:
            if cached:
                self.drop_teacher()
            batch = {k: v.to(self.device) for k, v in
                     make_batch(self.s["batch"], self.s["image_size"], self.teacher_dim() if cached else None).items()}
            batches = iter([batch] * (steps + 1 + self.compile + self.warmup))
        student = self.student()
        objective = self.objective(student, cached, precision)
        step_model = StepModule(student).train()
        optimizer = build_optimizer(student, OptimConfig(lr=1e-5))
        step = make_step(objective, step_model, optimizer, precision, self.device)

        compile_s = None
        if self.compile:
            # Dynamo does not compile under the FLOP counter (a dispatch mode): compile in a step of its own.
            t_compile = time.perf_counter()
            step(next(batches), update=False)
            compile_s = round(time.perf_counter() - t_compile, 1)
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # The first step is the warm-up (allocations, caches, worker start-up) and is the one whose FLOPs are counted.
        t_first = time.perf_counter()
        with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
            step(next(batches), update=False)
        first_s = time.perf_counter() - t_first
        flops = counter.get_total_flops()
        attention = sum(v for k, v in counter.get_flop_counts().get("Global", {}).items()
                        if "attention" in str(k))
        for _ in range(self.warmup):  # beyond the counted step: allocator, autotuning, loader start-up settle
            step(next(batches))
        sync(self.device)
        prof, times = None, []
        with contextlib.ExitStack() as stack:
            if profile:
                from torch.profiler import ProfilerActivity, profile as torch_profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
                prof = stack.enter_context(torch_profile(activities=activities, with_flops=True))
            for _ in range(steps):
                t0 = time.perf_counter()
                step(next(batches))
                sync(self.device)
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        mem = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else peak_rss()
        result = {
            "variant": variant, "precision": precision, "teacher": "cache" if cached else "online",
            "compiled_blocks": self.compile, "compile_step_seconds": compile_s,
            "setup": self.name, "student": self.s["student"], "teacher_model": self.s["teacher"],
            "image_size": self.s["image_size"], "batch": self.s["batch"], "classes": self.s["classes"],
            "depth_override": self.s["depth"], "steps_timed": steps, "warmup_steps": 1 + self.warmup,
            "first_step_seconds": round(first_s, 3), "step_seconds": round(step_s, 4),
            "step_seconds_each": [round(t, 4) for t in times],
            "images_per_second": round(self.s["batch"] / step_s, 4), "peak_memory_bytes": int(mem),
            "peak_memory_kind": "cuda max_memory_allocated" if self.device.type == "cuda" else "process peak RSS "
                                "(VmHWM, reset before the variant)",
            "model_flops_per_step": int(flops), "attention_flops_per_step": int(attention),
            # what DDP all-reduces every step: one gradient per trainable parameter, in the parameter's dtype
            "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
            "grad_bytes_per_step": sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad),
            "achieved_flops_per_second": round(flops / step_s), "matmul_peak": peak,
            "mfu": round(flops / step_s / peak["flops_per_second"], 4), **extra,
        }
        if prof is not None:
            result.update(profile_summary(prof, profile, steps, self.device, step_s))
        del student, objective, optimizer, step_model, batches
        gc.collect()
        if "e2e" in extra:  # the generated JPEGs and their cache
            shutil.rmtree(extra["e2e"].pop("folder"), ignore_errors=True)
        return result

    def e2e_batches(self, n_batches: int, workers: int, n_images: int) -> tuple[Any, dict[str, Any]]:
        """A DataLoader over generated JPEGs with their teacher cache (built here with the real teacher)."""
        from densevlm.data.regions import GridRegionDataset
        from densevlm.data.sources import ImageSource, ImageSourceConfig
        from densevlm.data.teacher_cache import TeacherCache, build_teacher_cache, cache_metadata, image_keys
        from densevlm.engine.trainer import EpochSampler
        from densevlm.data.transforms import CLIP_MEAN, CLIP_STD

        tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
        n_images = max(n_images, n_batches * self.s["batch"])
        write_jpegs(tmp / "images", n_images)
        source = ImageSource(ImageSourceConfig(kind="folder", path=str(tmp / "images")))
        teacher = self.teacher()
        meta = cache_metadata(teacher_name=teacher.name, teacher_weights=teacher.weights_id,
                              dense_last_block=teacher.dense_last_block, image_size=self.s["image_size"],
                              grid_style="densevlm", max_split=6, mean=CLIP_MEAN, std=CLIP_STD)
        t0 = time.perf_counter()
        summary = build_teacher_cache(teacher, source, tmp / "cache", meta, batch_size=self.s["batch"],
                                      progress=False)
        build_s = time.perf_counter() - t0
        self.drop_teacher()
        cache = TeacherCache(tmp / "cache", meta, image_keys(source))
        ds = GridRegionDataset(source, self.s["image_size"], max_boxes=36, teacher_cache=cache)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.s["batch"], sampler=EpochSampler(len(ds), 0),
                                             drop_last=True, num_workers=workers,
                                             pin_memory=self.device.type == "cuda",
                                             prefetch_factor=4 if workers else None)
        extra = {"e2e": {"images": n_images, "jpeg_size": [640, 480], "workers": workers,
                         "cache_bytes_per_image": summary["bytes_per_image"],
                         "cache_cells_per_image": summary["cells_per_image"],
                         "cache_build_images_per_second": round(n_images / build_s, 4),
                         "folder": str(tmp)}}
        return iter(loader), extra


    def interleaved(self, variants: list[str], rounds: int, steps: int) -> dict[str, Any]:
        """Step-only variants timed in alternation (A B A B ...) in one process on one student, so that machine
        noise hits each alike; medians over ``rounds``. The first variant is the reference of ``speedup``."""
        student = self.student()
        step_model = StepModule(student).train()
        optimizer = build_optimizer(student, OptimConfig(lr=1e-5))
        steps_of, flops = {}, {}
        for v in variants:
            precision, cached = v.split("-")[0], v.endswith("-cache")
            objective = self.objective(student, cached, precision)
            batch = make_batch(self.s["batch"], self.s["image_size"], self.teacher_dim() if cached else None)
            fn = make_step(objective, step_model, optimizer, precision, self.device)
            steps_of[v] = (fn, batch)
            if self.compile:
                fn(batch, update=False)  # compiles (dynamo does not compile under the FLOP counter)
            with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
                fn(batch, update=False)  # warm-up, counted
            flops[v] = counter.get_total_flops()
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for v in variants:
                fn, batch = steps_of[v]
                sync(self.device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn(batch)
                sync(self.device)
                samples[v].append((time.perf_counter() - t0) / steps)
        out = {}
        for v in variants:
            med = sorted(samples[v])[len(samples[v]) // 2]
            peak = self.peak(v.split("-")[0])
            out[v] = {"step_seconds_median": round(med, 4), "step_seconds": [round(x, 3) for x in samples[v]],
                      "images_per_second": round(self.s["batch"] / med, 4), "model_flops_per_step": int(flops[v]),
                      "mfu": round(flops[v] / med / peak["flops_per_second"], 4),
                      "speedup": round(sorted(samples[variants[0]])[rounds // 2] / med, 3)}
        return {"interleaved": variants, "rounds": rounds, "steps_per_round": steps, "setup": self.name,
                "compiled_blocks": self.compile,
                "image_size": self.s["image_size"], "batch": self.s["batch"], "results": out}


def profile_summary(prof: Any, top: int, steps: int, device: torch.device, step_s: float) -> dict[str, Any]:
    """The top ops of the timed steps by self time: CPU time on the CPU; on CUDA the kernels by device time, with
    their share of the kernels' total, and how much of the step the GPU was busy (the rest is launch/host time)."""
    table = prof.key_averages()
    if device.type != "cuda":
        total = sum(e.self_cpu_time_total for e in table) or 1
        rows = sorted(table, key=lambda e: -e.self_cpu_time_total)[:top]
        return {"profile_top_self_cpu": [
            {"op": e.key, "self_cpu_fraction": round(e.self_cpu_time_total / total, 4), "calls": e.count // steps}
            for e in rows]}

    def dev_time(e: Any) -> float:  # torch renamed cuda -> device in its profiler events
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))

    # Matrix-product ops with their FLOPs (profiled with_flops): achieved TFLOP/s over their device time.
    ops = sorted((e for e in table if getattr(e, "flops", 0) and (getattr(e, "device_time_total", 0)
                  or getattr(e, "cuda_time_total", 0))), key=lambda e: -e.flops)[:top]
    op_rates = [{"op": e.key, "tflop_per_step": round(e.flops / steps / 1e12, 3),
                 "achieved_tflops": round(e.flops / ((getattr(e, "device_time_total", 0)
                                                      or getattr(e, "cuda_time_total", 0)) * 1e-6) / 1e12, 1)}
                for e in ops]
    kernels = [e for e in table if dev_time(e) > 0]
    total = sum(dev_time(e) for e in kernels) or 1.0  # microseconds over the timed steps
    rows = sorted(kernels, key=lambda e: -dev_time(e))[:top]
    return {"gpu_busy_fraction_of_step": round(total / 1e6 / steps / step_s, 4), "profile_matmul_ops": op_rates,
            "profile_top_kernels": [
                {"kernel": e.key[:120], "device_fraction": round(dev_time(e) / total, 4),
                 "ms_per_step": round(dev_time(e) / 1e3 / steps, 3), "calls_per_step": e.count // steps}
                for e in rows]}


def make_step(objective: DenseVLMObjective, step_model: torch.nn.Module, optimizer: Any, precision: str,
              device: torch.device) -> Callable[..., None]:
    """One training step: objective (student forward under autocast, as accelerate's prepared model runs it),
    backward, optimiser update (skipped with ``update=False``: a counted step's FLOPs are the model's only)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward(fn: Callable, *args: Any) -> Any:
        with autocast:
            return step_model(fn, *args)

    def step(batch: dict[str, Any], update: bool = True) -> None:
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = objective(forward, batch)
        out.loss.backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", choices=["toy", "real", "all"], default="all")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one counted warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers of the e2e variant (default: every core on CUDA, else 2)")
    parser.add_argument("--batch", type=int, default=None, help="override the setup's batch (per device)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the counted warm-up step")
    parser.add_argument("--depth", type=int, default=None,
                        help="cut both vision towers to N blocks (dry runs of the script; not a measurement)")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file (atomically)")
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=None,
                        help="matrix sizes of the matmul-peak probe (default: 1024-4096 on CPU, 4096/8192 on CUDA)")
    parser.add_argument("--e2e-precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--e2e-images", type=int, default=0, help="generated JPEGs (default: enough for the steps)")
    parser.add_argument("--image-size", type=int, default=None, help="override the setup's image size")
    parser.add_argument("--classes", type=int, default=None, help="override the vocabulary size (random embeddings)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="report the top N ops of the timed steps")
    parser.add_argument("--force-low-precision", action="store_true",
                        help="time bf16 variants even where bf16 matmuls are slower than fp32")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="time the step-only --variants in alternation for ROUNDS rounds (medians, speedups)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each student block (regional; compile time is in first_step_seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.workers is None:
        args.workers = (os.cpu_count() or 2) if device.type == "cuda" else 2
    names = ["toy", "real"] if args.setup == "all" else [args.setup]
    results = []

    def make_bench(name: str) -> Bench:
        bench = Bench(name, device, args.image_size, args.classes, args.batch, args.depth)
        bench.warmup, bench.compile = args.warmup, args.compile
        bench.peak_sizes = tuple(args.peak_sizes) if args.peak_sizes else None
        bench.force_low_precision = args.force_low_precision
        return bench

    if args.interleave:
        for name in names:
            bench = make_bench(name)
            results.append(bench.interleaved([v for v in args.variants if v != "e2e"], args.interleave, args.steps))
            results[-1]["matmul_peaks"] = bench.peaks
        names = []
    for name in names:
        bench = make_bench(name)
        # Online variants first, then e2e (its cache build is the teacher's last use), then the cached ones: the
        # teacher is built once and dropped before the variants that must run without it.
        order = sorted(args.variants, key=lambda v: 2 if v.endswith("-cache") else int(v == "e2e"))
        for v in order:
            results.append(bench.run(v, args.steps, args.profile, args.workers, args.e2e_precision, args.e2e_images))
            print(json.dumps(results[-1]), flush=True, file=sys.stderr)
        results.append({"setup": name, "matmul_peaks": bench.peaks})
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
           "machine": platform.machine(), "results": results}
    text = json.dumps(out, indent=2)
    if args.json_out:
        from densevlm.utils.io import atomic_write_text

        atomic_write_text(Path(args.json_out), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
