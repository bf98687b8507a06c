#!/usr/bin/env python
"""bf16 vs fp32 training on the toy recipe: region classification after each, as one JSON object.

The recipe is the demo's DenseVLM stage (the zoo's toy-student tuned with the CLIPSelf-tuned toy teacher on the
demo world, seen classes only), trained three times: fp32 with seed 0, fp32 with seed 1 (how far two fp32 runs
land apart: the noise floor any precision difference is read against), and bf16 with seed 0. Every trained
student is evaluated in fp32 with the demo's region protocol, so only the training precision differs. The JSON
gives each run's top-1 keys, bf16 - fp32 per key, the seed spread, and ``max_abs_delta`` against the 1-point bar.

bf16 runs natively (``loop.precision: bf16``, autocast) on a GPU and on CPUs with a fast bf16 matmul. Elsewhere
(AVX2-only CPUs, where a bf16 matmul is ~70x slower than fp32) it runs under ``emulated_bf16`` (see
``densevlm/engine/emulated_bf16.py``): the same bf16 rounding of every matmul, convolution and attention, forward
and backward, on fp32 kernels. The JSON says which, with this CPU's two matmul rates, and the emulation's error
relative to native bf16 on one training step of the student (``emulation_fidelity``).

    python tools/bench_bf16_parity.py                      # the demo world in runs/demo (made if missing)
    python tools/bench_bf16_parity.py --mode native --out runs/bf16_parity_gpu
    python tools/bench_bf16_parity.py --config configs/demo/quick.yaml --out runs/bf16_parity_quick
    python tools/bench_bf16_parity.py --mode native --set world.workers=12 densevlm.loop.num_workers=8   # a GPU box
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def emulation_fidelity(model_name: str, image_size: int) -> dict[str, float]:
    """Relative error vs fp32 of native bf16 autocast and of the emulation: one student forward+backward."""
    from densevlm.config.model import ModelSpec
    from densevlm.engine.emulated_bf16 import emulated_bf16
    from densevlm.models import create_backbone

    model = create_backbone(ModelSpec(name=model_name)).train()
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def run(ctx: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with ctx:
            out = model.encode_dense(x)
            out = out[0] if isinstance(out, tuple) else out
            weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
            (out.float() * weight).sum().backward()
        return out.float().detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    ref, g_ref = run(contextlib.nullcontext())
    nat, g_nat = run(torch.autocast("cpu", dtype=torch.bfloat16))
    emu, g_emu = run(emulated_bf16())
    return {"model": model_name, "image_size": image_size,
            "features_rel_err_native": round(rel(nat, ref), 5), "features_rel_err_emulated": round(rel(emu, ref), 5),
            "grad_rel_err_native_median": round(statistics.median(rel(g_nat[k], g_ref[k]) for k in g_ref), 5),
            "grad_rel_err_emulated_median": round(statistics.median(rel(g_emu[k], g_ref[k]) for k in g_ref), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a demo profile (default: the demo's own defaults)")
    parser.add_argument("--out", default="runs/bf16_parity", help="where the three runs and evaluations go")
    parser.add_argument("--mode", choices=["auto", "native", "emulated"], default="auto",
                        help="how bf16 runs: auto = native where bf16 is fast (GPU, AMX/AVX512-BF16), else emulated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bar", type=float, default=1.0, help="the largest acceptable |bf16 - fp32| in points")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="demo-config overrides (e.g. world.workers=12 densevlm.loop.num_workers=8)")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file (atomically)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from densevlm.config import load_config
    from densevlm.config.demo import DemoConfig

    # The stages print their progress; stdout carries the JSON only.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args, load_config(DemoConfig, args.config, args.set))
    text = json.dumps(result, indent=2)
    if args.json_out:
        from densevlm.utils.io import atomic_write_text

        atomic_write_text(args.json_out, text + "\n")
    print(text)


def run(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    from densevlm.tasks.demo import align_configs, eval_stage, models_stage, train_stage, world_stage
    from densevlm.tasks.align import run_align
    from densevlm.engine.emulated_bf16 import emulated_bf16
    from densevlm.models import create_backbone, run_dir_spec
    from densevlm.utils.peak import matmul_peak

    cpu = torch.device("cpu")
    rates = {name: matmul_peak(cpu, dtype)["flops_per_second"] / 1e9
             for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    fast = rates["bfloat16"] >= 0.5 * rates["float32"]  # the rule bench_train.py skips bf16 variants by
    gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    mode = args.mode if args.mode != "auto" else ("native" if fast or gpu else "emulated")
    out = Path(args.out)
    world = world_stage(cfg, fresh=False)
    specs = models_stage(cfg, from_scratch=False)
    _, dense = align_configs(cfg, world, specs)

    runs = {"fp32": ("no", 0), "fp32-seed1": ("no", 1), f"bf16-{mode}": ("bf16" if mode == "native" else "no", 0)}
    result: dict[str, Any] = {"recipe": "demo DenseVLM stage", "mode": mode,
                              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpu_matmul_gflops": rates,
                              "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0], "runs": {}}
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.output_dir = str(out)
    for name, (precision, seed) in runs.items():
        stage = copy.deepcopy(dense)
        stage.output_dir = str(out / name)
        stage.loop.precision, stage.loop.seed = precision, seed
        ctx = emulated_bf16() if name == "bf16-emulated" else contextlib.nullcontext()
        t0 = time.time()
        with ctx as rounded:
            metrics = train_stage(f"[{name}]", stage, run_align, fresh=False)
        spec = run_dir_spec(stage.output_dir)
        regions = eval_stage(eval_cfg, world, {name: spec}, {name: create_backbone(spec)}, fresh=False)[name]
        top1 = {k: round(v, 2) for k, v in regions["metrics"].items() if k.endswith("macc1")}
        result["runs"][name] = {"precision": precision, "seed": seed, "steps": metrics.get("global_step"),
                                "train_seconds": metrics.get("train_seconds"),
                                "final_loss": metrics["history"][-1]["train"].get("loss"),
                                "wall_seconds": round(time.time() - t0, 1), "top1": top1}
        if rounded is not None and rounded.calls:
            result["runs"][name]["rounded_op_calls"] = rounded.calls
    fp32, seed1, low = (result["runs"][n]["top1"] for n in runs)
    delta = {k: round(low[k] - fp32[k], 2) for k in fp32}
    spread = {k: round(seed1[k] - fp32[k], 2) for k in fp32}
    result["bf16_minus_fp32"] = delta
    result["fp32_seed1_minus_seed0"] = spread
    result["max_abs_delta"] = max(abs(v) for v in delta.values())
    result["max_abs_seed_spread"] = max(abs(v) for v in spread.values())
    result["within_bar"] = result["max_abs_delta"] <= args.bar
    if mode == "emulated":
        result["emulation_fidelity"] = emulation_fidelity(cfg.student, dense.data.image_size)
    return result


if __name__ == "__main__":
    main()
