"""This machine's matrix-product rate per dtype: the peak that benchmarks report MFU against, and what tells a
CPU with fast bf16 (AMX, AVX512-BF16) from one where bf16 only emulates (AVX2)."""

from __future__ import annotations

import time
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 3072, 4096),
                reps: int = 3, max_seconds: float = 2.0) -> dict[str, Any]:
    """Best FLOP/s over ``reps`` products at each size; larger sizes are skipped once one product takes longer
    than ``max_seconds`` (slow dtypes)."""
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
