"""Worker for tests/test_preemption.py: a small model with dropout trained by the one Trainer, killed from outside.

``python preempt_worker.py RUN_DIR [--resume] [--sleep S] [--device cpu|cuda]`` (also under
``torch.distributed.run``). Prints ``step N`` after every optimiser step (rank 0) so the test knows where training
is; every rank writes ``RUN_DIR/../<name>.rank<r>.json`` when it is preempted, and exits with the trainer's
preemption code.

Without ``--device`` it trains on the CPU (tests/test_preemption.py). With it (tests/test_cuda.py) it trains on
that device, writes ``RUN_DIR/../<name>.rank<r>.device`` (the device and the process group's backend it ran on),
and on several processes joins a gloo process group: NCCL refuses two ranks on one GPU, and gloo is what the CPU
runs use, so both processes can share the single GPU of the test machine (each started with LOCAL_RANK=0 and that
one GPU visible, see tests/test_preemption.py::single_device_env).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import test_engine  # (this folder is on sys.path: the script's own, or added by the test that imports it)
import torch
from torch import nn

from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.engine.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted
from densevlm.engine.run_dir import prepare_run_dir_once
from densevlm.engine.trainer import Trainer
from densevlm.methods.base import ObjectiveOutput


class Points(test_engine.Points):
    """The engine tests' 48 points, as dict items that carry their index."""

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class DropNet(nn.Module):
    """Dropout makes every step depend on the global torch RNG: a resume that restored it wrongly differs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.fc(x)))).squeeze(-1)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


class MSE:
    def prepare(self, device: torch.device) -> None:
        pass

    def __call__(self, step_model: nn.Module, batch: dict) -> ObjectiveOutput:
        pred = step_model(_forward, batch["x"])
        return ObjectiveOutput(((pred - batch["y"]) ** 2).mean(), {})


@dataclass
class RunCfg:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=3, batch_size=4, grad_accum_steps=2, num_workers=0, log_every=1, cpu=True,
        checkpoint_every_steps=2, keep_checkpoints=3))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.01))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="train there (default: the CPU)")
    args = ap.parse_args(argv)
    cfg = RunCfg()
    cfg.loop.cpu = args.device in (None, "cpu")
    if args.device is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState(cpu=cfg.loop.cpu, backend="gloo")  # before the run directory's and the trainer's states
    run_dir = prepare_run_dir_once(args.run_dir, cfg, cpu=cfg.loop.cpu, resume=args.resume)
    torch.manual_seed(0)
    model = DropNet()
    rank = int(os.environ.get("RANK", "0"))

    def on_step(step: int, m: nn.Module) -> None:
        if rank == 0:
            print(f"step {step}", flush=True)
        time.sleep(args.sleep)

    trainer = Trainer(model=model, objective=MSE(), dataset=Points(), loop=cfg.loop, optim=cfg.optim,
                      run_dir=run_dir, ensemble_alpha=0.5, on_step=on_step)
    print(f"pid {os.getpid()} rank {rank}", flush=True)
    if args.device is not None:
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        Path(args.run_dir).parent.joinpath(f"{Path(args.run_dir).name}.rank{rank}.device").write_text(
            json.dumps({"device": str(trainer.accelerator.device), "backend": backend,
                        "processes": trainer.accelerator.num_processes}))
    try:
        trainer.fit(resume=args.resume)
    except TrainingPreempted as err:
        out = Path(args.run_dir).parent / f"{Path(args.run_dir).name}.rank{rank}.json"
        out.write_text(json.dumps({"signal": err.signal_name, "step": err.step, "checkpoint": str(err.checkpoint)}))
        print(f"preempted: {err}", flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
