#!/usr/bin/env python
"""The GPU check's table: reads what tools/gpu_check.sh wrote into one folder, prints a short table and every
target met or missed, and writes ``summary.json`` beside the inputs.

    python tools/gpu_report.py runs/gpu_check [--failed STEP ...]

Inputs (each optional; a missing one is reported as missing, never guessed): ``env.json``, ``cuda_tests.xml``
(pytest's JUnit XML), ``bench.json`` and ``profile.json`` (tools/bench_train.py), ``reference.json``
(tools/bench_reference.py), ``parity.json`` (tools/bench_bf16_parity.py).

The targets are issue 25's: the cached bf16 step at >= 4x the reference's images/s and >= 300 images/s per GPU at
512 px; the online-teacher bf16 step at >= 1.5x the reference; end to end (data loader) within 10 % of the
step-only cached step of the same precision; bf16 within 1 point of fp32 on every top-1 key.

It also projects a COCO epoch on 8 and 64 GPUs from the one GPU's cached bf16 step and the all-reduce volume it
measured (trainable parameters x bytes), at the bus bandwidths in ``BUS_BANDWIDTH`` (assumed, not measured).
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

#: COCO train2017, the reference recipe's training set.
COCO_TRAIN_IMAGES = 118_287
#: Assumed all-reduce bus bandwidth per GPU (bytes/s), as NCCL's all_reduce_perf reports it ("busbw"): one HGX
#: node of 8 H200 over NVLink 4 (900 GB/s bidirectional per GPU; ~360 GB/s busbw is typical), and 8 such nodes
#: over InfiniBand NDR, one 400 Gb/s NIC per GPU (50 GB/s; ~45 GB/s busbw), where the inter-node ring bounds it.
BUS_BANDWIDTH = {8: 360e9, 64: 45e9}

TARGETS = {"cache_vs_reference": 4.0, "cache_images_per_second": 300.0, "online_vs_reference": 1.5,
           "e2e_within": 0.10, "parity_points": 1.0}


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(path: Path) -> Optional[dict[str, Any]]:
    """Passed / failed / skipped counts and the failing tests' names from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            out["failed"] += 1
            out["failures"].append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def variants(bench: Optional[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if not bench:
        return {}
    return {r["variant"]: r for r in bench.get("results", []) if "variant" in r and "skipped" not in r}


def peaks(bench: Optional[dict[str, Any]]) -> dict[str, float]:
    out = {}
    for r in (bench or {}).get("results", []):
        for dtype, p in r.get("matmul_peaks", {}).items():
            out[dtype] = p["flops_per_second"] / 1e12
    return out


def target(name: str, measured: Optional[float], bar: float, higher: bool, text: str) -> dict[str, Any]:
    met = None if measured is None else (measured >= bar if higher else measured <= bar)
    return {"target": name, "measured": None if measured is None else round(measured, 3), "bar": bar,
            "met": met, "text": text}


def projection(run: dict[str, Any]) -> list[dict[str, Any]]:
    """COCO epoch time on 8 and 64 GPUs from one GPU's measured step (``run``: a bench_train result).

    Per step every GPU all-reduces ``grad_bytes_per_step``; a ring all-reduce moves 2 (n - 1) / n of it per GPU,
    which takes ``volume / busbw`` at the bus bandwidth NCCL reports. DDP overlaps it with the backward pass, so a
    step takes between max(compute, comm) (full overlap) and compute + comm (none). Data loading is taken as
    hidden (the e2e variant measures whether it is, on one GPU). Nothing here is measured on several GPUs."""
    step = run["step_seconds"]
    volume = run.get("grad_bytes_per_step")
    out = []
    for gpus, busbw in BUS_BANDWIDTH.items():
        comm = 2 * (gpus - 1) / gpus * volume / busbw if volume else None
        row = {"gpus": gpus, "per_gpu_batch": run["batch"], "bus_bandwidth_gb_s": busbw / 1e9,
               "allreduce_bytes_per_step": volume, "comm_seconds_per_step": comm, "compute_seconds_per_step": step}
        for name, t in (("overlap", max(step, comm or 0.0)), ("no_overlap", step + (comm or 0.0))):
            ips = gpus * run["batch"] / t
            row[f"images_per_second_{name}"] = ips
            row[f"epoch_minutes_{name}"] = COCO_TRAIN_IMAGES / ips / 60
        out.append(row)
    return out


def summarise(folder: Path, failed: list[str]) -> dict[str, Any]:
    env = read_json(folder / "env.json") or {}
    bench, profile = read_json(folder / "bench.json"), read_json(folder / "profile.json")
    ref, parity = read_json(folder / "reference.json"), read_json(folder / "parity.json")
    runs = variants(bench)
    ref_ips = ref.get("images_per_second") if ref else None

    rows = []
    if ref:
        rows.append({"variant": f"reference ({ref.get('precision')}, online teacher)", "batch": ref.get("batch"),
                     "step_seconds": ref.get("step_seconds_median"), "images_per_second": ref_ips,
                     "peak_gib": (ref.get("peak_memory_bytes") or 0) / 2**30, "mfu": None, "vs_reference": 1.0})
    for name in ("fp32", "bf16", "fp32-cache", "bf16-cache", "e2e"):
        r = runs.get(name)
        if r is None:
            continue
        label = name if name != "e2e" else f"e2e ({r.get('precision')}, cached, {r['e2e']['workers']} workers)"
        rows.append({"variant": label, "batch": r["batch"], "step_seconds": r["step_seconds"],
                     "images_per_second": r["images_per_second"], "peak_gib": r["peak_memory_bytes"] / 2**30,
                     "mfu": r.get("mfu"), "tflops": r["achieved_flops_per_second"] / 1e12,
                     "vs_reference": r["images_per_second"] / ref_ips if ref_ips else None})

    def ratio(name: str) -> Optional[float]:
        return runs[name]["images_per_second"] / ref_ips if ref_ips and name in runs else None

    e2e_gap = None
    if "e2e" in runs:
        base = runs.get(f"{runs['e2e']['precision']}-cache")
        if base:
            e2e_gap = 1 - runs["e2e"]["images_per_second"] / base["images_per_second"]
    cache_ips = runs["bf16-cache"]["images_per_second"] if "bf16-cache" in runs else None
    size = next((r["image_size"] for r in runs.values()), None)  # the setup's, whichever variants ran
    targets = [
        target("cached bf16 step vs the reference's step (images/s)", ratio("bf16-cache"),
               TARGETS["cache_vs_reference"], True, ">= 4x"),
        target(f"cached bf16 images/s per GPU at {size} px", cache_ips, TARGETS["cache_images_per_second"], True,
               ">= 300"),
        target("online-teacher bf16 step vs the reference's step", ratio("bf16"), TARGETS["online_vs_reference"],
               True, ">= 1.5x"),
        target("e2e slower than the step-only cached step by", e2e_gap, TARGETS["e2e_within"], False, "<= 10 %"),
        target("bf16 vs fp32, largest |difference| of a top-1 key (points)",
               parity.get("max_abs_delta") if parity else None, TARGETS["parity_points"], False, "<= 1"),
    ]
    top = {}
    for r in (profile or {}).get("results", []):
        if "profile_top_kernels" in r or "profile_top_self_cpu" in r:
            top[r["variant"]] = {k: r.get(k) for k in ("gpu_busy_fraction_of_step", "profile_top_kernels",
                                                     "profile_matmul_ops", "profile_top_self_cpu") if k in r}
    return {"env": env, "tests": test_counts(folder / "cuda_tests.xml"), "matmul_peak_tflops": peaks(bench),
            "rows": rows, "batch_sweep": [{"batch": r["batch"], "images_per_second": r["images_per_second"],
                                           "peak_gib": round(r["peak_memory_bytes"] / 2**30, 1)}
                                          for r in (bench or {}).get("batch_sweep", [])],
            "reference": ref, "parity": parity and {k: parity.get(k) for k in (
                "mode", "device", "bf16_minus_fp32", "fp32_seed1_minus_seed0", "max_abs_delta",
                "max_abs_seed_spread", "within_bar")},
            "profile": top, "targets": targets, "failed_steps": failed,
            "projection": {"variant": "bf16-cache", "coco_images": COCO_TRAIN_IMAGES,
                           "measured_images_per_second_per_gpu": cache_ips,
                           "rows": projection(runs["bf16-cache"]) if "bf16-cache" in runs else []},
            "missing": [f for f in ("env.json", "cuda_tests.xml", "bench.json", "profile.json", "reference.json",
                                    "parity.json") if not (folder / f).is_file()]}


def fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(s: dict[str, Any]) -> str:
    env, lines = s["env"], []
    lines.append(f"GPU check: {env.get('gpu', 'no GPU (dry run)')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                 f"{env.get('cores')} cores")
    t = s["tests"]
    lines.append("cuda tests: " + ("missing" if t is None else
                                   f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                                   + (f" ({', '.join(t['failures'])})" if t["failures"] else "")))
    lines.append("matmul peak (TFLOP/s, this call): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                                 sorted(s["matmul_peak_tflops"].items())))
    if s["batch_sweep"]:
        lines.append("batch sweep, cached bf16: " + ", ".join(
            f"{r['batch']}: {r['images_per_second']:.1f} img/s ({r['peak_gib']} GiB)" for r in s["batch_sweep"]))
    lines.append("")
    lines.append(f"{'variant':<40} {'batch':>5} {'step s':>8} {'img/s':>8} {'peak GiB':>8} {'TFLOP/s':>8} "
                 f"{'MFU':>6} {'vs ref':>7}")
    for r in s["rows"]:
        lines.append(f"{r['variant']:<40} {r['batch']:>5} {fmt(r['step_seconds'], '.4f'):>8} "
                     f"{fmt(r['images_per_second'], '.1f'):>8} {fmt(r['peak_gib'], '.1f'):>8} "
                     f"{fmt(r.get('tflops'), '.1f'):>8} {fmt(r['mfu'], '.3f'):>6} "
                     f"{fmt(r['vs_reference'], '.2f'):>7}")
    if s["profile"]:
        for variant, p in s["profile"].items():
            kernels = p.get("profile_top_kernels") or []
            lines.append(f"profile {variant}: GPU busy {fmt(p.get('gpu_busy_fraction_of_step'), '.0%')} of the step; "
                         + "; ".join(f"{k['kernel'][:40]} {k['device_fraction']:.0%}" for k in kernels[:4]))
    proj = s["projection"]["rows"]
    if proj:
        lines.append("")
        volume = proj[0]["allreduce_bytes_per_step"]
        lines.append(f"projected COCO epoch (bf16, cached teacher; measured "
                     f"{s['projection']['measured_images_per_second_per_gpu']:.1f} img/s on one GPU; all-reduce "
                     f"{fmt(volume and volume / 1e6, '.0f')} MB/step):")
        for r in proj:
            comm = r["comm_seconds_per_step"]
            lines.append(f"  {r['gpus']:>2} GPUs at {r['bus_bandwidth_gb_s']:.0f} GB/s busbw: comm "
                         f"{fmt(comm and comm * 1e3, '.1f')} ms vs compute {r['compute_seconds_per_step'] * 1e3:.1f} ms"
                         f" per step -> {r['epoch_minutes_overlap']:.2f} min/epoch (overlapped) .. "
                         f"{r['epoch_minutes_no_overlap']:.2f} (not)")
    lines.append("")
    for tg in s["targets"]:
        mark = {True: "met   ", False: "MISSED", None: "n/a   "}[tg["met"]]
        lines.append(f"[{mark}] {tg['target']}: {fmt(tg['measured'], '.3f')} (bar {tg['text']})")
    if s["missing"]:
        lines.append("missing: " + ", ".join(s["missing"]))
    if s["failed_steps"]:
        lines.append("failed steps: " + ", ".join(s["failed_steps"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--failed", nargs="*", default=[], help="names of gpu_check steps that failed")
    args = parser.parse_args()
    folder = Path(args.folder)
    summary = summarise(folder, [f for f in args.failed if f])
    from densevlm.utils.io import atomic_write_json

    atomic_write_json(folder / "summary.json", summary)
    print(render(summary))


if __name__ == "__main__":
    main()
