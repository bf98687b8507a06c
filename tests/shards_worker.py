"""Worker for tests/test_multinode.py: one process of a 2-node x 2-process gloo job that trains a tiny dropout model
on streamed shards with the one Trainer (started with the env:// variables `torchrun --nnodes 2 --node_rank R` and
`accelerate launch --num_machines 2 --machine_rank R` set for each process).

``python shards_worker.py SHARDS RUN_DIR OUT [--resume] [--sleep S] [--workers N]``. After every optimiser step each rank compares
its weights with rank 0's (broadcast) and records the sample ids of its batches; rank 0 prints ``step N``. At the
end every rank writes ``OUT/rank<r>.json``: its ids per epoch, the largest weight difference to rank 0 per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from densevlm.config.train import LoopConfig, OptimConfig
from densevlm.data.shards import open_shards
from densevlm.data.stream import ShardStream
from densevlm.engine.run_dir import prepare_run_dir_once
from densevlm.engine.trainer import Trainer
from densevlm.methods.base import ObjectiveOutput


def to_item(sample: dict) -> dict:
    x = torch.tensor(list(sample["image"].resize((4, 4)).getdata()), dtype=torch.float32).flatten() / 255.0
    return {"x": x, "y": x.mean(), "index": sample["index"]}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop, self.out = nn.Linear(48, 16), nn.Dropout(0.3), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.fc(x)))).squeeze(-1)


class MSE:
    def __init__(self, ids: list) -> None:
        self.ids = ids

    def prepare(self, device: torch.device) -> None:
        pass

    def __call__(self, step_model: nn.Module, batch: dict) -> ObjectiveOutput:
        self.ids.append(batch["index"].tolist())
        pred = step_model(lambda m, x: m(x), batch["x"])
        return ObjectiveOutput(((pred - batch["y"]) ** 2).mean(), {})


@dataclass
class RunCfg:
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        epochs=2, batch_size=2, num_workers=2, cpu=True, log_every=1, checkpoint_every_steps=2, keep_checkpoints=2,
        world_size=4))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("run_dir")
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--workers", type=int, default=2, help="data-loader workers per process")
    args = ap.parse_args()
    cfg = RunCfg()
    cfg.loop.num_workers = args.workers
    loop, optim = cfg.loop, cfg.optim
    run_dir = prepare_run_dir_once(args.run_dir, cfg, cpu=True, resume=args.resume)
    torch.manual_seed(0)
    ids: list = []
    stream = ShardStream(open_shards(args.shards), to_item, seed=5)
    diffs: list[float] = []
    rank = int(os.environ["RANK"])

    def on_step(step: int, model: nn.Module) -> None:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diffs.append(float((flat - ref).abs().max()))
        if rank == 0:
            print(f"step {step}", flush=True)
        time.sleep(args.sleep)

    trainer = Trainer(model=Net(), objective=MSE(ids), dataset=stream, loop=loop, optim=optim, run_dir=run_dir,
                      on_step=on_step, ensemble_alpha=None)
    trainer.fit(resume=args.resume)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"ids": ids, "per_epoch": len(stream), "diffs": diffs,
                                                              "world": trainer.accelerator.num_processes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
