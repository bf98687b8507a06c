"""This machine's peaks for benchmarks: the matrix-product rate per dtype (what MFU is reported against, and what
tells a CPU with fast bf16 (AMX, AVX512-BF16) from one where bf16 only emulates (AVX2)), and the process's peak
resident memory."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux VmHWM, which /proc/self/clear_refs can reset; else
    getrusage's lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072, 4096),
                reps: int = 3, max_seconds: float = 2.0) -> dict[str, Any]:
    """Best FLOP/s over ``reps`` products at each size; larger sizes are skipped once one product takes longer
    than ``max_seconds`` (slow dtypes). On CUDA: :func:`cuda_matmul_peak`."""
    if device.type == "cuda":
        return cuda_matmul_peak(device, dtype)
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t0 = time.perf_counter()
        a @ b  # warm-up
        sync(device)
        slow = time.perf_counter() - t0 > max_seconds
        for _ in range(1 if slow else reps):
            t0 = time.perf_counter()
            a @ b
            sync(device)
            rate = 2 * n**3 / (time.perf_counter() - t0)
            if rate > best:
                best, best_n = rate, n
        if slow:
            break
    return {"flops_per_second": round(best), "best_size": best_n}


def cuda_matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (4096, 8192),
                     reps: int = 10, rounds: int = 5) -> dict[str, Any]:
    """A GPU's matrix-product rate: random operands (never zeros, which run faster), three warm-up products, then
    ``rounds`` timings of ``reps`` back-to-back products between CUDA events; the median round of the best size.
    fp32 runs as the framework runs it by default (no TF32 unless the caller enabled it)."""
    best, best_n, spread = 0.0, 0, []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
        b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize(device)
        rates = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                a @ b
            end.record()
            end.synchronize()
            rates.append(2 * n**3 * reps / (start.elapsed_time(end) * 1e-3))
        rate = sorted(rates)[len(rates) // 2]
        if rate > best:
            best, best_n, spread = rate, n, rates
        del a, b
    return {"flops_per_second": round(best), "best_size": best_n, "timing": "CUDA events, median of "
            f"{rounds} rounds of {reps} products", "rounds_tflops": [round(r / 1e12, 1) for r in spread],
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
