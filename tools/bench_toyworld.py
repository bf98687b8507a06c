#!/usr/bin/env python
"""Benchmark the toy-world generator: images per second, counting rendering and writing every file
(JPEGs, panoptic and semantic PNGs, the COCO JSON files, world.json) and the worker pool's start-up.

Prints one JSON object. ``images_per_cpu_s`` (images per second of CPU time, summed over the main process and
the workers) is the figure to compare between machines or runs on a busy machine; ``load_avg_1m`` says how
busy the machine was when the run started.

    python tools/bench_toyworld.py                      # 2000 images of the default world, 2 workers
    python tools/bench_toyworld.py --num 500 --workers 0 --config configs/toyworld/quick.yaml
"""

from __future__ import annotations

import os

# One thread per process: the benchmark measures the generator's own processes, not BLAS thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from densevlm.config.core import load_config  # noqa: E402
from densevlm.config.toyworld import ToyWorldConfig  # noqa: E402
from densevlm.toyworld import generate_world  # noqa: E402


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers count once the pool has joined them
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a toy-world YAML (default: the built-in defaults)")
    p.add_argument("--num", type=int, default=2000, help="images to generate (as the train split)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the config's, 2)")
    p.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the config's)")
    p.add_argument("--out", default=None, help="write the world here and keep it (default: a temporary dir)")
    args = p.parse_args(argv)

    overrides = [f"num_train={args.num}", "num_val=0"]
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.image_size is not None:
        overrides.append(f"image_size={args.image_size}")
    cfg = load_config(ToyWorldConfig, args.config, overrides)

    tmp = None if args.out else tempfile.mkdtemp(prefix="bench_toyworld_")
    root = Path(args.out) if args.out else Path(tmp) / "world"
    load = os.getloadavg()[0]
    try:
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        generate_world(cfg, root, overwrite=bool(args.out), progress=False)
        seconds = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "images_per_s": round(cfg.num_train / seconds, 1),
        "seconds": round(seconds, 3),
        "images": cfg.num_train,
        "workers": cfg.workers,
        "image_size": cfg.image_size,
        "cpu_seconds": round(cpu, 3),
        "images_per_cpu_s": round(cfg.num_train / cpu, 1),
        "megabytes": round(size / 2**20, 2),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(load, 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
